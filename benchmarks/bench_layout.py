"""Channels-last (NHWC) weights for Conv4 on this CPU: faster, but not the same result. Prints the training-step time
of both layouts (same process, timing.compare: interleaved rounds, median) and each layout's float32 gradient error
against a float64 reference, for ProtoNet (60-way 1-shot 5-query episodes) and Pretrainer (batches of 128), on
Omniglot-sized images.

    python benchmarks/bench_layout.py [--rounds 5]

Measured here (README, "Measured results"): NHWC is about 1.3x faster, and its gradients are about 1e-2 away from
float64 against 1e-5 for the default layout, so the library does not switch layouts for you.
"""

from __future__ import annotations

import argparse

import torch
from timing import compare, per_call

from lightning_meta import Episode, LabelledBatch, Pretrainer, ProtoNet
from lightning_meta.data import SyntheticGlyphs
from lightning_meta.models import Conv4


def build(kind: str, dtype=torch.float32, channels_last: bool = False):
    torch.manual_seed(0)
    model = ProtoNet(Conv4()) if kind == "protonet" else Pretrainer(Conv4(), num_classes=60)
    model = model.to(dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batch(kind: str, x: torch.Tensor, dtype=torch.float32):
    x = x.to(dtype)
    if kind == "protonet":  # 60-way 1-shot 5-query: 60 support and 300 query images
        return Episode(x[None, :60], torch.arange(60)[None], x[None, 60:360], torch.arange(300)[None] % 60)
    return LabelledBatch(x[:128], torch.arange(128) % 60)


def gradient(model, b) -> torch.Tensor:
    model.zero_grad()
    model.training_step(b, 0).backward()
    # a convolution's bias before batch norm has a zero gradient up to rounding: it says nothing about precision
    return torch.cat([p.grad.flatten().double() for n, p in model.named_parameters()
                      if p.grad is not None and not (n.startswith("backbone.features") and n.endswith("0.bias"))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    args = p.parse_args()
    x = SyntheticGlyphs(num_classes=60, samples_per_class=6, seed=0).gather(torch.arange(360))
    for kind in ("protonet", "pretrainer"):
        reference = gradient(build(kind, torch.float64), batch(kind, x, torch.float64))
        errors = {}
        for layout in (False, True):
            g = gradient(build(kind, channels_last=layout), batch(kind, x))
            errors[layout] = ((g - reference).norm() / reference.norm()).item()
        models = {layout: build(kind, channels_last=layout) for layout in (False, True)}
        b = batch(kind, x)
        names = {False: "default layout", True: "channels_last"}
        results = compare({names[layout]: lambda model=model, b=b: per_call(lambda: gradient(model, b), args.steps)
                           for layout, model in models.items()}, rounds=args.rounds)
        print(f"{kind}: gradient error against float64: default {errors[False]:.1e}, channels_last {errors[True]:.1e}")
        print(results.table(baseline="default layout"))


if __name__ == "__main__":
    main()
