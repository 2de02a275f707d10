"""Episode sampling speed: lightning-meta's sampler against learn2learn's TaskDataset on the same images.

5-way 1-shot 15-query episodes of 28x28 Omniglot (images_background_small1, decoded once into memory for both, so
this compares sampling and assembly, not PNG decoding). learn2learn gets its best case: a dataset serving the same
cached tensors, wrapped in MetaDataset, with NWays / KShots / LoadData / RemapLabels. Both are run side by side in this
process, in alternating rounds (timing.compare); the figure is the ratio of episodes per second.

    python benchmarks/bench_sampling.py [--episodes 2000 --rounds 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import compare, per_call

from lightning_meta.data import Omniglot
from lightning_meta.data.sampler import ClassEpisodeSampler

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


class CachedImages(torch.utils.data.Dataset):
    """The same uint8 cache served item by item, as a plain map-style dataset (learn2learn's input)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.images[i].float().div_(255), int(self.ds.labels[i])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", default=str(ROOT))
    args = p.parse_args()
    ds = Omniglot(args.root, ["images_background_small1"])
    print(f"data: {ds}")
    sampler = ClassEpisodeSampler(ds, n_way=5, n_shot=1, n_query=15, seed=0)
    counter = iter(range(10**9))
    n = args.episodes
    contenders = {  # seconds per episode
        "lightning-meta, one episode per call": lambda: per_call(lambda: sampler.batch("train", 0, [next(counter)]), n),
        "lightning-meta, meta-batch of 32": lambda: per_call(
            lambda: sampler.batch("train", 0, [next(counter) for _ in range(32)]), n // 32) / 32,
    }
    try:
        import learn2learn as l2l
    except Exception as err:
        print(f"learn2learn not importable ({err}); install it with `make l2l` for the comparison")
        print(compare(contenders, rounds=args.rounds).table(unit="episode", work=1))
        return
    meta = l2l.data.MetaDataset(CachedImages(ds))
    tasks = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, 5), l2l.data.transforms.KShots(meta, 16),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta),
    ], num_tasks=-1)
    contenders["learn2learn TaskDataset"] = lambda: per_call(tasks.sample, max(n // 10, 50))
    results = compare(contenders, rounds=args.rounds)
    print(results.table(baseline="learn2learn TaskDataset", unit="episode", work=1))
    print("(target: lightning-meta >= 20x learn2learn's rate per episode)")


if __name__ == "__main__":
    main()
