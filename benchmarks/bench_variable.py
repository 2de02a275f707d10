"""What a ragged meta-batch of variable episodes costs: one meta-batch of B variable-way, variable-shot tasks
(lightning_meta.RaggedEpisode) against the same tasks run one at a time (each a meta-batch of one, gradients summed)
and against padding every task to the largest one (a fixed [B, S_max] / [B, M_max] meta-batch of N_max ways: the cost
of the padding approach, not its numbers), for ProtoNet and second-order MAML (one inner step) on Conv4, 84 px and
28 px inputs, B = 4 and 16. Each contender takes the same pre-drawn episodes; rounds interleave (timing.compare), one
untimed warm-up round first, the median reported. A training step here is forward + meta-loss + backward (no optimizer
step, so every contender sees the same weights).

Then the sampling side: variable episodes per second from an in-memory 1,000-class uint8 source (what the decoded
cache serves), against today's fixed 5-way 1-shot 15-query episodes from the same source.

The episode sizes are Meta-Dataset's rules with CPU-sized constants (printed): the reference's 50 ways and 500 support
images per episode take seconds per MAML task on two CPU cores.

    python benchmarks/bench_variable.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from timing import compare

from lightning_meta import MAML, Episode, EpisodicDataModule, ProtoNet, RaggedEpisode
from lightning_meta.data import TensorClassDataset, VariableEpisodePlanner, VariableEpisodes
from lightning_meta.models import Conv4

RULES = VariableEpisodes(min_way=5, max_way=10, max_query=5, max_support=50, max_support_per_class=10)


def variable_tasks(rng: np.random.Generator, count: int, side: int, channels: int) -> list[Episode]:
    """``count`` variable episodes (random images) from a 100-class source of 12 to 40 images per class."""
    sizes = rng.integers(12, 41, size=100)
    planner = VariableEpisodePlanner(sizes, RULES)
    tasks = []
    for _ in range(count):
        plan = planner.plan(rng, items=False)
        n, q = plan.n_way, plan.n_query
        sy = torch.arange(n).repeat_interleave(torch.from_numpy(plan.shots))
        qy = torch.arange(n).repeat_interleave(q)
        tasks.append(Episode(torch.rand(len(sy), channels, side, side), sy, torch.rand(len(qy), channels, side, side), qy))
    return tasks


def padded(tasks: list[Episode]) -> Episode:
    """The tasks padded to the largest support, query and way: extra rows cycle through all N_max labels (so every
    class of the wider episode has an example), inputs zero. A fixed-shape meta-batch of the padded size."""
    s = max(len(t.support_y) for t in tasks)
    m = max(len(t.query_y) for t in tasks)
    n = max(int(t.support_y.max()) + 1 for t in tasks)

    def grow(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        extra = size - len(y)
        labels = torch.arange(n).repeat(size // n + 1)[:extra]
        return torch.cat([x, x.new_zeros(extra, *x.shape[1:])]), torch.cat([y, labels])

    parts = [(*grow(t.support_x, t.support_y, s), *grow(t.query_x, t.query_y, m)) for t in tasks]
    sx, sy, qx, qy = (torch.stack(f) for f in zip(*parts))
    sy[:, :n] = torch.arange(n)  # every class present in every padded task
    return Episode(sx, sy, qx, qy)


def learner(kind: str, side: int, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "ProtoNet":
        return ProtoNet(Conv4(in_channels=channels, image_size=side), normalize=None)
    return MAML(Conv4(in_channels=channels, out_features=RULES.max_way, image_size=side), inner_lr=0.1, inner_steps=1,
                allow_wider_head=True, normalize=None)


def step(model: torch.nn.Module, batch) -> None:
    model.zero_grad(set_to_none=True)
    model.training_step(batch, 0).backward()


def one_at_a_time(model: torch.nn.Module, tasks: list[Episode]) -> None:
    model.zero_grad(set_to_none=True)
    for t in tasks:  # the mean over tasks: each task's loss / B, gradients summed
        (model.training_step(Episode(*(f[None] for f in t)), 0) / len(tasks)).backward()


def time_case(kind: str, batches: list[list[Episode]], side: int, channels: int, rounds: int) -> None:
    model = learner(kind, side, channels)
    ragged = [RaggedEpisode.from_tasks(t) for t in batches]
    pads = [padded(t) for t in batches]
    cursor = {"ragged": iter(ragged), "one": iter(batches), "padded": iter(pads)}
    results = compare({
        "ragged meta-batch": lambda: step(model, next(cursor["ragged"])),
        "one task at a time": lambda: one_at_a_time(model, next(cursor["one"])),
        "padded to the largest": lambda: step(model, next(cursor["padded"])),
    }, rounds=rounds, warmup=1)
    real = np.mean([sum(r.support_sizes) + sum(r.query_sizes) for r in ragged])
    big = np.mean([p.support_y.numel() + p.query_y.numel() for p in pads])
    print(f"\n{kind}, Conv4, {side} px, {len(batches[0])} tasks per meta-batch ({real:.0f} support+query images per "
          f"meta-batch, {big:.0f} when padded):")
    print(results.table(baseline="one task at a time", unit="meta-batch"))


def training_table(rounds: int, quick: bool) -> None:
    rng = np.random.default_rng(0)
    print(f"Training steps on variable episodes ({RULES}):")
    for side, channels in ((28, 1), (84, 3)):
        for b in (4,) if quick else (4, 16):
            batches = [variable_tasks(rng, b, side, channels) for _ in range(rounds + 1)]
            for kind in ("ProtoNet", "MAML"):
                time_case(kind, batches, side, channels, rounds)


def sampling_table(rounds: int, episodes: int) -> None:
    rng = np.random.default_rng(1)
    labels = torch.arange(1000).repeat_interleave(torch.from_numpy(rng.integers(20, 61, size=1000)))
    images = torch.randint(0, 256, (len(labels), 1, 28, 28), dtype=torch.uint8)
    source = TensorClassDataset(images, labels)
    batch = 16
    variable = EpisodicDataModule(train=source, n_way=None, n_shot=None, n_query=None, meta_batch_size=batch,
                                  variable_episodes=VariableEpisodes(), train_episodes=episodes)
    fixed = EpisodicDataModule(train=source, n_way=5, n_shot=1, n_query=15, meta_batch_size=batch,
                               train_episodes=episodes)
    samplers = {}
    for name, dm in (("variable (Meta-Dataset defaults)", variable), ("fixed 5-way 1-shot 15-query", fixed)):
        dm.setup("fit")
        samplers[name] = dm.samplers["train"]
    steps = episodes // batch
    counter = {name: 0 for name in samplers}

    def run(name: str) -> float:
        sampler, start = samplers[name], counter[name]
        counter[name] += steps
        clock = time.perf_counter()
        for s in range(start, start + steps):  # new episodes every round
            sampler.batch("train", 0, range(s * batch, (s + 1) * batch))
        return (time.perf_counter() - clock) / steps

    results = compare({name: (lambda name=name: run(name)) for name in samplers}, rounds=rounds, warmup=1)
    print(f"\nSampling meta-batches of {batch} episodes (uint8 28x28, in memory, 1,000 classes of 20-60 images):")
    print(results.table(baseline="fixed 5-way 1-shot 15-query", unit="meta-batch", work=batch))
    shapes = [samplers["variable (Meta-Dataset defaults)"].batch("train", 0, range(i * batch, (i + 1) * batch))
              for i in range(8)]
    images = np.mean([sum(s.support_sizes) + sum(s.query_sizes) for s in shapes])
    print(f"  (a variable meta-batch holds {images:.0f} images on average, a fixed one {batch * 5 * 16})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="28 and 84 px at B=4 only, fewer sampled episodes")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; constants {dataclasses.asdict(RULES)}")
    training_table(args.rounds, args.quick)
    sampling_table(args.rounds, 320 if args.quick else 3200)


if __name__ == "__main__":
    main()
