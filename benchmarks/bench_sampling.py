"""Episode sampling speed: lightning-meta's sampler against learn2learn's TaskDataset on the same images.

5-way 1-shot 15-query episodes of 28x28 Omniglot (images_background_small1, decoded once into memory for both, so
this compares sampling and assembly, not PNG decoding). learn2learn gets its best case: a dataset serving the same
cached tensors, wrapped in MetaDataset, with NWays / KShots / LoadData / RemapLabels. Both are run side by side in this
process; the figure is the ratio of episodes per second.

    python benchmarks/bench_sampling.py [--episodes 2000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

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


def rate(fn, episodes: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(episodes):
        fn()
    return episodes / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--root", default=str(ROOT))
    args = p.parse_args()
    ds = Omniglot(args.root, ["images_background_small1"])
    print(f"data: {ds}")
    sampler = ClassEpisodeSampler(ds, n_way=5, n_shot=1, n_query=15, seed=0)
    counter = iter(range(10**9))
    ours = rate(lambda: sampler.batch("train", 0, [next(counter)]), args.episodes)
    print(f"lightning-meta ClassEpisodeSampler: {ours:10.0f} episodes/s (one episode per call)")
    batched = 32 * rate(lambda: sampler.batch("train", 0, [next(counter) for _ in range(32)]), args.episodes // 32)
    print(f"lightning-meta, meta-batch of 32:   {batched:10.0f} episodes/s (one gather per meta-batch)")
    try:
        import learn2learn as l2l
    except Exception as err:
        print(f"learn2learn not importable ({err}); install it with `make l2l` for the comparison")
        return
    meta = l2l.data.MetaDataset(CachedImages(ds))
    tasks = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, 5), l2l.data.transforms.KShots(meta, 16),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta),
    ], num_tasks=-1)
    theirs = rate(tasks.sample, max(args.episodes // 10, 50))
    print(f"learn2learn TaskDataset:            {theirs:10.0f} episodes/s")
    print(f"ratio: {ours / theirs:.1f}x learn2learn's rate per episode, {batched / theirs:.1f}x per meta-batch of 32 "
          "(target >= 20x)")


if __name__ == "__main__":
    main()
