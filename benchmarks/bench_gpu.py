"""GPU step times of every learner, and where MAML's task-parallel `vmap` pays off on a GPU (needs CUDA).

Prints the median time of a training step (forward, backward, Adam) after a warm-up (timing.median_time), per precision:
  maml      Conv4 5-way 1-shot 15-query, meta-batch 32, 1 step, second order: vmap over tasks vs the task loop
  sinusoid  MLP 40-40, meta-batch 25, K=10: vmap vs loop
  protonet  Conv4, 60-way 1-shot 5-query episodes (the Omniglot training recipe)
  attention Conv4 + 2 transformer blocks (dim 128), 20-way 1-shot 5-query, meta-batch 4
  fp16      MAML float16 meta-gradients against float32 for a grid of inner and outer loss scales
  compile   the MAML paper's Omniglot meta-step (Conv4 5-way 1-shot 15-query, meta-batch 32, second order) and ANIL
            compiled (compile=True: the inner loop as one inductor graph; and mode="reduce-overhead": CUDA graphs),
            in 32-true and bf16-mixed, against learn2learn and our eager vmap in the same call: ms per step, the
            speed-ups, peak CUDA memory, and the projected time of the paper's 60,000 meta-steps. `--device cpu
            --steps 4 --meta-batch 2` runs the same code on a CPU (a check that the script works, not a measurement)
  l2l       second-order MAML and ANIL against learn2learn's (clone/adapt per task) on the GPU, 32-true: Conv4 as
            in `maml` and the sinusoid, with peak CUDA memory (and first-order memory); needs learn2learn's source
            on the path (its pure-Python MAML is loaded on its own when the package's compiled parts or
            dependencies are missing)

    python benchmarks/bench_gpu.py [--cases maml sinusoid protonet attention fp16 l2l compile] [--steps 20]

One short GPU run that measures what issue #15 asks (a few minutes on an H100):

    python benchmarks/bench_gpu.py --cases compile --steps 15
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import float_images, median_time

from lightning_meta import ANIL, MAML, AttentionLearner, ProtoNet
from lightning_meta.data import Sinusoid, SyntheticGlyphs
from lightning_meta.data.sources import make_sampler
from lightning_meta.models import MLP, Conv4

DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def batches(source, way, shot, query, meta_batch, count, device):
    sampler = make_sampler(source, way, shot, query, 0, "bench")
    return [float_images(sampler.batch("train", 0, range(s * meta_batch, (s + 1) * meta_batch))).to(device)
            for s in range(count)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_time(model, data, precision: str, warmup: int = 3, device: str = "cuda") -> float:
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = DTYPES[precision]

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(data[i], i)
        loss.backward()
        opt.step()

    return median_time(step, len(data), warmup, functools.partial(synchronize, device))


def case_maml(steps: int) -> None:
    print("MAML Conv4 5-way 1-shot 15-query, meta-batch 32, 1 inner step, second order (ms/step):")
    data = batches(SyntheticGlyphs("train"), 5, 1, 15, 32, steps, "cuda")
    torch.manual_seed(0)
    net = Conv4(out_features=5)
    for precision in DTYPES:
        row = {tp: step_time(MAML(copy.deepcopy(net), inner_lr=0.4, task_parallel=tp), data, precision) * 1e3
               for tp in ("loop", "vmap")}
        print(f"  {precision:10s} loop {row['loop']:7.1f}   vmap {row['vmap']:7.1f}   vmap speed-up "
              f"{row['loop'] / row['vmap']:4.1f}x")


def case_sinusoid(steps: int) -> None:
    print("MAML sinusoid MLP 40-40, meta-batch 25, K=10, 1 step, second order (ms/step, 32-true):")
    data = batches(Sinusoid(), 1, 10, 10, 25, steps, "cuda")
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1)
    row = {tp: step_time(MAML(copy.deepcopy(net), inner_lr=0.01, task_parallel=tp), data, "32-true") * 1e3
           for tp in ("loop", "vmap")}
    print(f"  loop {row['loop']:7.1f}   vmap {row['vmap']:7.1f}   vmap speed-up {row['loop'] / row['vmap']:4.1f}x")


def case_episodes(name: str, steps: int) -> None:
    if name == "protonet":
        make, (way, query, mb) = (lambda: ProtoNet(Conv4())), (60, 5, 1)
    else:
        make, (way, query, mb) = (lambda: AttentionLearner(Conv4(), max_way=60, dim=128, depth=2, heads=4)), (20, 5, 4)
    print(f"{name} Conv4, {way}-way 1-shot {query}-query, meta-batch {mb} (episodes/s):")
    data = batches(SyntheticGlyphs("train"), way, 1, query, mb, steps, "cuda")
    for precision in DTYPES:
        torch.manual_seed(0)
        print(f"  {precision:10s} {mb / step_time(make(), data, precision):8.1f}")


def case_fp16() -> None:
    print("MAML Conv4 (hidden 16, 3-way 5-shot, 2 inner steps) float16 meta-gradient vs float32 (no TF32): cosine")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    data = batches(SyntheticGlyphs("train"), 3, 5, 5, 4, 1, "cuda")[0]
    for inner in (1.0, 64.0, 1024.0):
        torch.manual_seed(0)
        model = MAML(Conv4(hidden=16, out_features=3), inner_lr=0.4, inner_steps=2, inner_loss_scale=inner).cuda()

        def grads(scale, dtype, model=model):
            model.zero_grad()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model.training_step(data, 0)
            (loss * scale).backward()
            return torch.cat([p.grad.flatten().float() / scale for p in model.parameters()])

        full = grads(1.0, None)
        cells = []
        for outer in (1.0, 64.0, 1024.0, 65536.0):
            try:
                half = grads(outer, torch.float16)
                cos = F.cosine_similarity(full, half, dim=0).item() if torch.isfinite(half).all() else float("nan")
                cells.append(f"outer {outer:7.0f}: {cos:.4f}")
            except FloatingPointError:
                cells.append(f"outer {outer:7.0f}: inner inf")
        print(f"  inner scale {inner:6.0f}  " + "  ".join(cells))


@functools.cache
def learn2learn_maml():
    """learn2learn's ``MAML`` class. Its package ``__init__`` imports datasets with compiled parts and gym; the
    algorithm itself is three pure-Python files, loaded on their own when the full import fails."""
    try:
        from learn2learn.algorithms import MAML as L2LMAML
        return L2LMAML
    except ImportError:
        pass
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or spec.origin is None:
        raise SystemExit("the l2l case needs learn2learn's source on the path (pip install learn2learn, or PYTHONPATH)")
    root = Path(spec.origin).parent
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", root / "algorithms")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def l2l_step_time(net, inner_lr, data, loss_fn, anil: bool = False, first_order: bool = False,
                  warmup: int = 3, device: str = "cuda") -> float:
    """learn2learn's meta-step as its examples write it: clone and adapt per task; for ANIL the body runs per task
    on the task's support and queries, and only the head is cloned and adapted."""
    net = net.to(device)
    adapted = learn2learn_maml()(net.head if anil else net, lr=inner_lr, first_order=first_order)
    params = list(net.features.parameters()) + list(adapted.parameters()) if anil else list(adapted.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)

    def step(i: int) -> None:
        batch = data[i]
        opt.zero_grad(set_to_none=True)
        total = 0
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = batch.task(t)
            if anil:
                feats = net.features(torch.cat([sx, qx]))
                sx, qx = feats[: len(sx)], feats[len(sx):]
            learner = adapted.clone()
            learner.adapt(loss_fn(learner(sx), sy))
            total = total + loss_fn(learner(qx), qy)
        (total / batch.num_tasks).backward()
        opt.step()

    return median_time(step, len(data), warmup, functools.partial(synchronize, device))


def with_peak(fn, *args, **kwargs) -> tuple[float, float]:
    """``(fn(...), peak CUDA memory in MiB above what was allocated before)``: model, optimizer and activations
    (NaN off CUDA)."""
    if kwargs.get("device", "cuda") != "cuda":
        return fn(*args, **kwargs), float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*args, **kwargs)
    return out, (torch.cuda.max_memory_allocated() - base) / 2**20


def case_l2l(steps: int) -> None:
    print("second-order MAML and ANIL against learn2learn on the GPU, 32-true (ms/step; peak CUDA memory):")
    mse = lambda out, y: F.mse_loss(out.squeeze(-1), y)  # noqa: E731
    glyphs = batches(SyntheticGlyphs("train"), 5, 1, 15, 32, steps, "cuda")
    sines = batches(Sinusoid(), 1, 10, 10, 25, steps, "cuda")
    for name, make, cls, lr, data, loss_fn in (
        ("Conv4 MAML 5-way 1-shot 15-query, meta-batch 32", lambda: Conv4(out_features=5), MAML, 0.4, glyphs,
         F.cross_entropy),
        ("Conv4 ANIL, the same episodes", lambda: Conv4(out_features=5), ANIL, 0.4, glyphs, F.cross_entropy),
        ("sinusoid MLP 40-40, meta-batch 25, K=10", lambda: MLP(1, (40, 40), 1), MAML, 0.01, sines, mse),
    ):
        torch.manual_seed(0)
        net = make()
        theirs, their_mem = with_peak(l2l_step_time, copy.deepcopy(net), lr, data, loss_fn, anil=cls is ANIL)
        ours, our_mem = with_peak(step_time, cls(copy.deepcopy(net), inner_lr=lr), data, "32-true")
        print(f"  {name}: learn2learn {theirs * 1e3:7.1f}   lightning-meta {ours * 1e3:7.1f}   "
              f"{theirs / ours:5.1f}x learn2learn;   memory {their_mem:7.0f} vs {our_mem:7.0f} MiB")
    torch.manual_seed(0)
    net = Conv4(out_features=5)
    print("  Conv4 MAML, speed against memory (a task's or chunk's graph is freed as soon as it is done):")
    for label, kwargs in (("vmap, whole meta-batch", {"task_parallel": "vmap"}),
                          *((f"vmap, task_chunk={c}", {"task_parallel": "vmap", "task_chunk": c}) for c in (16, 8, 4)),
                          ("task loop", {"task_parallel": "loop"})):
        t, mem = with_peak(step_time, MAML(copy.deepcopy(net), inner_lr=0.4, **kwargs), glyphs, "32-true")
        print(f"    {label:24s} {t * 1e3:7.1f} ms  {mem:7.0f} MiB")
    _, theirs = with_peak(l2l_step_time, copy.deepcopy(net), 0.4, glyphs, F.cross_entropy, first_order=True)
    _, ours = with_peak(step_time, MAML(copy.deepcopy(net), inner_lr=0.4, first_order=True), glyphs, "32-true")
    print(f"  Conv4 MAML first order: peak memory learn2learn {theirs:7.0f} vs lightning-meta {ours:7.0f} MiB")


PROTOCOL_STEPS = 60_000  # the MAML paper's Omniglot meta-training


def case_compile(steps: int, device: str, meta_batch: int = 32) -> None:
    """Compiled MAML and ANIL against learn2learn and our eager vmap, measured in one call on the same episodes."""
    print(f"compiled MAML / ANIL, Conv4 5-way 1-shot 15-query, meta-batch {meta_batch}, 1 inner step, second order, "
          f"on {device} (median ms/step after 3 warm-up steps; the first compiles):")
    data = batches(SyntheticGlyphs("train"), 5, 1, 15, meta_batch, steps, device)
    torch.manual_seed(0)
    net = Conv4(out_features=5)
    for name, cls in (("MAML", MAML), ("ANIL", ANIL)):
        theirs, their_mem = with_peak(l2l_step_time, copy.deepcopy(net), 0.4, data, F.cross_entropy,
                                      anil=cls is ANIL, device=device)
        eager, eager_mem = with_peak(step_time, cls(copy.deepcopy(net), inner_lr=0.4, task_parallel="vmap"), data,
                                     "32-true", device=device)
        print(f"  {name}: learn2learn {theirs * 1e3:8.1f} ms {their_mem:7.0f} MiB;  eager vmap {eager * 1e3:8.1f} ms "
              f"{eager_mem:7.0f} MiB ({theirs / eager:4.1f}x learn2learn)")
        for label, option, precision in (("compiled", True, "32-true"),
                                         ("compiled + CUDA graphs", {"mode": "reduce-overhead"}, "32-true"),
                                         ("compiled", True, "bf16-mixed"),
                                         ("compiled + CUDA graphs", {"mode": "reduce-overhead"}, "bf16-mixed")):
            torch.compiler.reset()
            learner = cls(copy.deepcopy(net), inner_lr=0.4, task_parallel="vmap", compile=option)
            t, mem = with_peak(step_time, learner, data, precision, device=device)
            fallbacks = learner.compiled_fallbacks()
            print(f"    {label:24s} {precision:10s} {t * 1e3:8.1f} ms {mem:7.0f} MiB  {theirs / t:5.1f}x learn2learn  "
                  f"{eager / t:4.1f}x eager  {PROTOCOL_STEPS} steps in {PROTOCOL_STEPS * t / 60:6.1f} min"
                  + (f"  (ran eagerly: {fallbacks})" if fallbacks else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["maml", "sinusoid", "protonet", "attention", "fp16", "l2l"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: run the compile case's code on the CPU (a smoke check)")
    p.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-batch in the compile case")
    args = p.parse_args()
    if args.device != "cuda":
        if set(args.cases) != {"compile"}:
            raise SystemExit("--device cpu runs the compile case only: pass --cases compile")
        case_compile(args.steps, args.device, args.meta_batch)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; the CPU figures come from the other benchmarks.")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for case in args.cases:
        if case == "maml":
            case_maml(args.steps)
        elif case == "sinusoid":
            case_sinusoid(args.steps)
        elif case in ("protonet", "attention"):
            case_episodes(case, args.steps)
        elif case == "fp16":
            case_fp16()
        elif case == "l2l":
            case_l2l(args.steps)
        elif case == "compile":
            case_compile(args.steps, "cuda", args.meta_batch)


if __name__ == "__main__":
    main()
