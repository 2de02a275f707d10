"""Training throughput of the AttentionLearner beside ProtoNet, on the same pre-drawn Omniglot episodes and the same
Conv4 backbone, both through a Lightning Trainer in this process (timing.compare: interleaved rounds, median).

    python benchmarks/bench_attention.py [--way 20 --shot 1 --query 5 --meta-batch 4 --steps 30 --rounds 3]
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
from bench_protonet import ROOT, Listed, timed_fit
from timing import compare
from torch.utils.data import DataLoader

from lightning_meta import AttentionLearner, ProtoNet
from lightning_meta.data import Omniglot
from lightning_meta.data.sampler import ClassEpisodeSampler
from lightning_meta.models import Conv4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("way", 20), ("shot", 1), ("query", 5), ("meta-batch", 4), ("steps", 30), ("rounds", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    ds = Omniglot(ROOT, ["images_background_small1"])
    sampler = ClassEpisodeSampler(ds, args.way, args.shot, args.query, seed=0)
    b = args.meta_batch
    episodes = [sampler.batch("train", 0, range(i * b, (i + 1) * b)) for i in range(args.steps)]
    torch.manual_seed(0)
    backbone = Conv4()
    learners = {"ProtoNet": lambda bb: ProtoNet(bb),
                "AttentionLearner": lambda bb: AttentionLearner(bb, max_way=args.way, dim=128, depth=2, heads=4)}
    results = compare({name: lambda make=make: timed_fit(L.Trainer, L.Callback, make(copy.deepcopy(backbone)),
                                                         DataLoader(Listed(episodes), batch_size=None), len(episodes))
                       for name, make in learners.items()}, rounds=args.rounds)
    print(f"{args.way}-way {args.shot}-shot {args.query}-query Omniglot, meta-batch {b}, Conv4, "
          f"{torch.get_num_threads()} threads: training throughput (median of {args.rounds} rounds)")
    print(results.table(baseline="ProtoNet", work=b))


if __name__ == "__main__":
    main()
