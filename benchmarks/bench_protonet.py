"""Per-episode training step time of the Lightning ProtoNet against a bare PyTorch loop and learn2learn's
LightningPrototypicalNetworks, on the same pre-drawn Omniglot episodes (images_background_small1, 28x28) and the same
Conv4, in one process (timing.compare: rounds interleaved, one untimed warm-up round first, the median reported).
Each contender times its own steps after the first WARMUP steps of a run.

    python benchmarks/bench_protonet.py [--way 20 --shot 1 --query 15 --steps 60 --rounds 3]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from timing import Stopwatch, compare, float_images
from torch.utils.data import DataLoader

from lightning_meta import ProtoNet
from lightning_meta.data import Omniglot
from lightning_meta.data.sampler import ClassEpisodeSampler
from lightning_meta.functional import class_prototypes, squared_euclidean
from lightning_meta.models import Conv4

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
WARMUP = 5


class Listed(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def bare(backbone, episodes) -> float:
    opt = torch.optim.Adam(backbone.parameters(), lr=1e-3)
    clock = Stopwatch()
    for i, ep in enumerate(DataLoader(Listed(episodes), batch_size=None)):
        if i == WARMUP:
            clock.start()
        sx, sy, qx, qy = ep
        b, s, m = sx.shape[0], sx.shape[1], qx.shape[1]
        z = backbone(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)])).flatten(1)
        protos = class_prototypes(z[: b * s].view(b, s, -1), sy, int(sy.max()) + 1)
        logits = -squared_euclidean(z[b * s :].view(b, m, -1), protos)
        loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    clock.stop()
    return clock.wall / (len(episodes) - WARMUP)


def timed_fit(trainer_cls, callback_cls, module, loader, steps) -> float:
    clock = Stopwatch()

    class Clock(callback_cls):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == WARMUP:
                clock.start()

        def on_train_end(self, trainer, pl_module):
            clock.stop()

    trainer = trainer_cls(max_steps=steps, callbacks=[Clock()], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          accelerator="cpu", devices=1)
    trainer.fit(module, loader)
    return clock.wall / (steps - WARMUP)


def ours(backbone, episodes) -> float:
    return timed_fit(L.Trainer, L.Callback, ProtoNet(backbone, lr=1e-3),
                     DataLoader(Listed(episodes), batch_size=None), len(episodes))


def l2l_format(ep, way, shot, query):
    """learn2learn's batch: ([1, N*(K+Q), ...], [1, N*(K+Q)]), each class's K support items then its Q queries."""
    sx, qx = ep.support_x[0].view(way, shot, *ep.support_x.shape[2:]), ep.query_x[0].view(way, query, *ep.query_x.shape[2:])
    data = torch.cat([sx, qx], 1).flatten(0, 1)
    labels = torch.arange(way).repeat_interleave(shot + query)
    return data[None], labels[None]


def theirs(backbone, episodes, way, shot, query) -> float:
    import pytorch_lightning as PL
    from learn2learn.algorithms.lightning import LightningPrototypicalNetworks

    module = LightningPrototypicalNetworks(backbone, train_ways=way, train_shots=shot, train_queries=query, lr=1e-3)
    batches = [l2l_format(ep, way, shot, query) for ep in episodes]
    loader = DataLoader(Listed(batches), batch_size=None)
    return timed_fit(PL.Trainer, PL.Callback, module, loader, len(episodes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--way", type=int, default=20)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", default=str(ROOT))
    args = p.parse_args()
    ds = Omniglot(args.root, ["images_background_small1"])
    sampler = ClassEpisodeSampler(ds, args.way, args.shot, args.query, seed=0)
    episodes = [float_images(sampler.batch("train", 0, [i])) for i in range(args.steps)]
    torch.manual_seed(0)
    backbone = Conv4()
    try:
        import learn2learn  # noqa: F401

        contenders = {"bare loop": bare, "lightning-meta": ours,
                      "learn2learn": lambda b, e: theirs(b, e, args.way, args.shot, args.query)}
    except Exception as err:
        print(f"learn2learn not importable ({err}): comparing against the bare loop only")
        contenders = {"bare loop": bare, "lightning-meta": ours}
    results = compare({name: lambda fn=fn: fn(copy.deepcopy(backbone), episodes) for name, fn in contenders.items()},
                      rounds=args.rounds)
    print(f"{args.way}-way {args.shot}-shot {args.query}-query Omniglot episodes, Conv4, {args.steps} steps x "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads; median ms per training step:")
    print(results.table(baseline="lightning-meta"))
    print(f"lightning-meta overhead over the bare loop: {100 * (results.ratio('lightning-meta', 'bare loop') - 1):+.1f}% "
          "(target <= 5%)")
    if "learn2learn" in results:
        print(f"learn2learn / lightning-meta step time: {results.ratio('learn2learn', 'lightning-meta'):.2f}x")


if __name__ == "__main__":
    main()
