"""MAML meta-step speed and memory against learn2learn, side by side in one run on the same episodes and weights.

Cases (second order, 1 inner step, Adam outer step; the contenders take turns in blocks of steps on the same
episodes after a warm-up, and each is summarised by its median (timing.compare, timing.median_time)):
  sinusoid  MLP 40-40, meta-batch 25, K=10 (ours: vmap over tasks, and the functional loop)
  omniglot  Conv4, 5-way 1-shot 15-query 28x28, meta-batch 32 (ours: the functional loop that `auto` picks for convs,
            with batch_norm="support", the default, and "transductive", learn2learn's semantics), with achieved
            GFLOP/s (torch.utils.flop_counter) beside this machine's float32 matmul GFLOP/s
  anil      the same Omniglot setup, ANIL: our body runs once per meta-batch; learn2learn's per task, as in its examples
  memory    peak resident memory added by 3 meta-steps of the Omniglot case, each contender in a fresh process,
            second order and first order
  compiled  the Omniglot case with compile=True (each task's inner loop and query pass one inductor graph) beside
            the eager loop and learn2learn, with the compilation time; --profile adds where one meta-step's
            milliseconds go for each of them (torch.profiler, grouped by operator family)

    python benchmarks/bench_maml.py [--cases sinusoid omniglot anil memory compiled] [--steps 5] [--every-step]
                                    [--profile]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import Results, Stopwatch, compare, float_images, median_time, per_call

from lightning_meta import ANIL, MAML
from lightning_meta.data import Omniglot, Sinusoid
from lightning_meta.data.sources import make_sampler
from lightning_meta.models import MLP, Conv4

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def batches(case: str, steps: int):
    if case == "sinusoid":
        sampler = make_sampler(Sinusoid(), 1, 10, 10, 0, "sinusoid")
        return [sampler.batch("train", 0, range(s * 25, (s + 1) * 25)) for s in range(steps)]
    ds = Omniglot(ROOT, ["images_background_small1"])
    sampler = make_sampler(ds, 5, 1, 15, 0, "omniglot")
    return [float_images(sampler.batch("train", 0, range(s * 32, (s + 1) * 32))) for s in range(steps)]


def loss_fn(out, y):
    return F.mse_loss(out.squeeze(-1), y) if y.is_floating_point() else F.cross_entropy(out, y)


def ours_step(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()

    return step


def l2l_maml_step(net, inner_lr, first_order=False):
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(net, lr=inner_lr, first_order=first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step(batch):
        opt.zero_grad()
        total = 0
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = batch.task(t)
            learner = maml.clone()
            learner.adapt(loss_fn(learner(sx), sy))
            total = total + loss_fn(learner(qx), qy)
        (total / batch.num_tasks).backward()
        opt.step()

    return step


def l2l_anil_step(net, inner_lr):
    import learn2learn as l2l

    head = l2l.algorithms.MAML(net.head, lr=inner_lr, first_order=False)
    opt = torch.optim.Adam(list(net.features.parameters()) + list(head.parameters()), lr=1e-3)

    def step(batch):
        opt.zero_grad()
        total = 0
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = batch.task(t)
            feats = net.features(torch.cat([sx, qx]))
            learner = head.clone()
            learner.adapt(loss_fn(learner(feats[: len(sx)]), sy))
            total = total + loss_fn(learner(feats[len(sx) :]), qy)
        (total / batch.num_tasks).backward()
        opt.step()

    return step


def contenders(case: str, first_order: bool = False):
    torch.manual_seed(0)
    if case == "compiled":
        net, lr = Conv4(out_features=5), 0.4
        return {"lightning-meta compiled": ours_step(MAML(copy.deepcopy(net), inner_lr=lr, compile=True)),
                "lightning-meta eager": ours_step(MAML(copy.deepcopy(net), inner_lr=lr)),
                "learn2learn": l2l_maml_step(copy.deepcopy(net), lr)}
    if case == "sinusoid":
        net, lr = MLP(1, (40, 40), 1), 0.01
        return {"lightning-meta (vmap)": ours_step(MAML(copy.deepcopy(net), inner_lr=lr, task_parallel="vmap")),
                "lightning-meta (loop)": ours_step(MAML(copy.deepcopy(net), inner_lr=lr, task_parallel="loop")),
                "learn2learn": l2l_maml_step(copy.deepcopy(net), lr)}
    net, lr = Conv4(out_features=5), 0.4
    # ours twice: batch_norm="support" (the default: queries normalised with the support's statistics) and
    # "transductive" (query batch statistics, what learn2learn computes)
    if case == "anil":
        return {"lightning-meta ANIL": ours_step(ANIL(copy.deepcopy(net), inner_lr=lr)),
                "lightning-meta ANIL transd.": ours_step(ANIL(copy.deepcopy(net), inner_lr=lr, batch_norm="transductive")),
                "learn2learn ANIL": l2l_anil_step(copy.deepcopy(net), lr)}
    return {"lightning-meta": ours_step(MAML(copy.deepcopy(net), inner_lr=lr, first_order=first_order)),
            "lightning-meta transd.": ours_step(MAML(copy.deepcopy(net), inner_lr=lr, first_order=first_order,
                                                     batch_norm="transductive")),
            "learn2learn": l2l_maml_step(copy.deepcopy(net), lr, first_order)}


def time_case(case: str, steps: int, warmup: int = 2, rounds: int = 3, every_step: bool = False,
              runs: dict | None = None) -> Results:
    """Seconds per meta-step of each contender. The contenders alternate in blocks of ``steps`` steps on the same
    episodes (a block's figure: its median step), ``rounds`` times, so machine noise falls on all of them alike while
    each step follows a step of its own model, as in training. ``every_step`` alternates after every step instead:
    each step then starts with the other libraries' data in the caches, which costs a small network's step more than
    a large one's."""
    data = batches("omniglot" if case == "compiled" else case, steps + warmup)
    runs = runs or contenders(case)
    for step in runs.values():
        for batch in data[:warmup]:
            step(batch)
    timed = data[warmup:]
    if every_step:
        cursors = {name: itertools.cycle(timed) for name in runs}
        return compare({name: lambda name=name, run=run: run(next(cursors[name])) for name, run in runs.items()},
                       rounds=rounds * len(timed), warmup=0)
    return compare({name: lambda run=run: median_time(lambda i: run(timed[i]), len(timed)) for name, run in runs.items()},
                   rounds=rounds, warmup=0)


FAMILIES = (  # operator families of a profile, by the first pattern an event's name contains
    ("compiled kernels (inductor: batch norm, ReLU, pooling, losses fused)", ("CompiledFxGraph",)),
    ("convolution backward", ("convolution_backward",)), ("convolution", ("convolution",)),
    ("max pooling", ("max_pool",)), ("batch norm", ("batch_norm",)),
    ("ReLU", ("threshold_backward", "clamp_min", "relu")), ("scatter (compiled pooling backward)", ("scatter",)),
    ("matmul", ("addmm", "aten::mm", "bmm")), ("fill / zeros", ("fill_", "zero_")),
)


def profile_step(step, batch) -> None:
    """Where one meta-step's milliseconds go: self CPU time per operator family (torch.profiler), summing to the
    profiled total; the rest is every other operator (elementwise arithmetic, copies, autograd bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, Stopwatch() as clock:
        step(batch)
    wall = clock.wall
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    grouped = dict.fromkeys([name for name, _ in FAMILIES] + ["everything else"], 0.0)
    for e in events:
        family = next((name for name, keys in FAMILIES if any(k in e.key for k in keys)), "everything else")
        grouped[family] += e.self_cpu_time_total / 1e3
    print(f"    profiled step {wall * 1e3:.0f} ms wall ({total:.0f} ms of operator self time):")
    for name, ms in grouped.items():
        if ms >= 0.5:
            print(f"      {name:66s} {ms:7.0f} ms  {100 * ms / total:5.1f}%")


def case_compiled(steps: int, profile: bool) -> None:
    print("Omniglot Conv4 5-way 1-shot 15-query, meta-batch 32, 1 step, second order, compiled (inductor):")
    runs = contenders("compiled")
    first = batches("omniglot", 1)[0]
    with Stopwatch() as clock:
        runs["lightning-meta compiled"](first)
    print(f"  first compiled step (compiles the inner loop, and checks it against eager once): {clock.wall:.1f} s")
    report("compiled", time_case("compiled", steps, runs=runs))
    if profile:
        for name, step in runs.items():
            print(f"  {name}:")
            profile_step(step, first)


def gflops_of_step(batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    step = ours_step(MAML(Conv4(out_features=5), inner_lr=0.4))
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops() / 1e9


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / per_call(lambda: a @ b, reps) / 1e9


def memory_child(name: str) -> None:
    data = batches("omniglot", 3)
    library, _, order = name.partition(" ")
    step = contenders("omniglot", first_order=order == "first-order")[library]
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size: data loading is excluded
    for batch in data:
        step(batch)
    print(f"{(_rss_kib('VmHWM') - before) / 1024:.0f}")


def _rss_kib(field: str) -> int:
    line = next(li for li in Path("/proc/self/status").read_text().splitlines() if li.startswith(field + ":"))
    return int(line.split()[1])


def report(case: str, results: Results) -> None:
    print(results.table(baseline=next(k for k in results if k.startswith("learn2learn")), unit="meta-step"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["sinusoid", "omniglot", "anil", "memory"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--every-step", action="store_true", help="alternate the contenders after every step (see time_case)")
    p.add_argument("--profile", action="store_true", help="with the compiled case: where each step's time goes")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "sinusoid" in args.cases:
        print("sinusoid MLP 40-40, meta-batch 25, K=10, 1 step, second order:")
        report("sinusoid", time_case("sinusoid", max(args.steps, 20), every_step=args.every_step))
    if "omniglot" in args.cases:
        print("Omniglot Conv4 5-way 1-shot 15-query, meta-batch 32, 1 step, second order:")
        results = time_case("omniglot", args.steps, every_step=args.every_step)
        report("omniglot", results)
        gflop = gflops_of_step(batches("omniglot", 1)[0])
        achieved = gflop / results.median("lightning-meta")
        print(f"  one meta-step = {gflop:.1f} GFLOP: lightning-meta achieves {achieved:.1f} GFLOP/s; "
              f"this machine's float32 matmul peak: {matmul_gflops():.1f} GFLOP/s")
    if "anil" in args.cases:
        print("ANIL, same Omniglot setup:")
        report("anil", time_case("anil", args.steps, every_step=args.every_step))
    if "compiled" in args.cases:
        case_compiled(args.steps, args.profile)
    if "memory" in args.cases:
        print("peak memory added by 3 Omniglot meta-steps (fresh process each):")
        for name in ("lightning-meta", "learn2learn", "lightning-meta first-order", "learn2learn first-order"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", name], capture_output=True, text=True)
            value = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-300:]}"
            print(f"  {name:26s} {value} MiB")


if __name__ == "__main__":
    main()
