"""Data at benchmark scale: the decoded-image cache against decoding in every process.

Generates a class-folder dataset of JPEG images (default 1,000 classes x 200 = 200,000 images of 96x96, resized to
84x84 on load), then measures, each in a fresh process:

1. today's path (``cache=False``): serial PIL decode into process memory: images/s and the process's private memory;
2. the first build of the cache (parallel decode over the cores): images/s;
3. a second construction (cache hit): seconds to the first episode, and the private memory (``Anonymous:`` in
   ``/proc/<pid>/smaps_rollup``; pages of the mapped cache file do not count) after 100 ProtoNet meta-batches;
4. 2 DDP processes x 2 DataLoader workers training ProtoNet (a minimal embedding, so the data path shows), once from
   the cache and once from learn2learn's ``TaskDataset`` on the same files: episodes/s, and the private memory of all
   their processes together (the sum of ``Pss_Anon``: pages a forked worker shares with its rank count once);
5. the bytes per meta-batch moved to the device: uint8 episodes against float32 ones.

    python benchmarks/bench_data_scale.py                      # the README's table (~15 min on 2 cores)
    python benchmarks/bench_data_scale.py --classes 100        # 20,000 images, a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from timing import Stopwatch

HERE = Path(__file__).resolve().parent
EPISODE = dict(n_way=5, n_shot=1, n_query=15)


def anonymous_kib(pid: int | str = "self", field: str = "Anonymous:") -> int:
    """Private (anonymous) memory of a process in KiB, from ``/proc/<pid>/smaps_rollup`` (``Pss_Anon:`` shares the pages
    a forked worker still shares with its parent between them, so a sum over processes counts each page once)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


# ------------------------------------------------------------------------------------------------ the dataset
def _write_class(args: tuple[str, int, int, int]) -> None:
    from PIL import Image

    root, c, per_class, side = args
    folder = Path(root) / f"class{c:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(c)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = rng.random(3)
    for i in range(per_class):  # smooth images with a class colour and a per-image pattern (a few KB as JPEG)
        f = rng.random(4) * 6
        img = np.stack([np.sin(f[0] * xx + f[1] * yy + base[ch] * 6) for ch in range(3)], -1) * 0.5 + 0.5
        img = (img * 0.7 + 0.3 * base) * 255
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


def generate(root: Path, classes: int, per_class: int, side: int) -> None:
    marker = root / f".complete-{classes}x{per_class}x{side}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with Pool(os.cpu_count()) as pool, Stopwatch() as clock:
        pool.map(_write_class, [(str(root), c, per_class, side) for c in range(classes)], chunksize=8)
    marker.touch()
    print(f"generated {classes * per_class:,} JPEGs of {side}x{side} in {clock.wall:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ child processes
def child_construct(root: str, cache: str, train_steps: int) -> dict:
    """Construct the dataset (cache=False when ``cache`` is empty), draw the first episode, optionally train."""
    import torch

    from lightning_meta import EpisodicDataModule
    from lightning_meta.data import ClassFolder

    before = anonymous_kib()
    clock = Stopwatch()
    with clock:
        ds = ClassFolder(root, image_size=84, cache=cache or False)
    built = clock.wall
    with clock:  # adds to the construction time: construction to the first episode
        data = EpisodicDataModule(train=ds, meta_batch_size=4, train_episodes=4 * max(train_steps, 1), **EPISODE)
        first = next(iter(data.train_dataloader()))
    result = {"images": len(ds), "construct_s": built, "first_episode_s": clock.wall,
              "anon_after_construct_mib": (anonymous_kib() - before) / 1024,
              "bytes_uint8": sum(x.numel() * x.element_size() for x in first),
              "bytes_float32": sum(x.numel() * (4 if x.dtype == torch.uint8 else x.element_size()) for x in first)}
    if train_steps:
        import lightning as L

        from lightning_meta import ProtoNet
        from lightning_meta.models import Conv4

        trainer = L.Trainer(max_steps=train_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(ProtoNet(Conv4(in_channels=3, hidden=16)), data)
        result["anon_after_train_mib"] = (anonymous_kib() - before) / 1024
    return result


def child_ddp(root: str, source: str, steps: int, out: str) -> None:
    """2 DDP processes (gloo), 2 workers each, training ProtoNet for ``steps`` meta-batches of 16 tasks per rank (the
    global meta-batch of 32 of ``examples/distributed.py``)."""
    import lightning as L
    import torch

    from lightning_meta import EpisodicDataModule, ProtoNet
    from lightning_meta.data import ClassFolder

    if source == "ours":
        train = ClassFolder(root, image_size=84)
    else:
        import learn2learn as l2l
        import torchvision
        from torchvision import transforms

        folder = torchvision.datasets.ImageFolder(root, transform=transforms.Compose(
            [transforms.Resize((84, 84)), transforms.ToTensor()]))
        meta = l2l.data.MetaDataset(folder, indices_to_labels=dict(enumerate(folder.targets)))
        train = l2l.data.TaskDataset(meta, task_transforms=[
            l2l.data.transforms.NWays(meta, EPISODE["n_way"]),
            l2l.data.transforms.KShots(meta, EPISODE["n_shot"] + EPISODE["n_query"]),
            l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta)], num_tasks=-1)

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, *args):
            self.times.append(time.perf_counter())

    clock = Clock()
    data = EpisodicDataModule(train=train, meta_batch_size=16, train_episodes=16 * 2 * steps, num_workers=2, **EPISODE)
    trainer = L.Trainer(max_steps=steps, strategy="ddp", devices=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    # a minimal embedding (average pooling, one linear layer), so that the figure is the data path's, not a network's
    embed = torch.nn.Sequential(torch.nn.AvgPool2d(6), torch.nn.Flatten(), torch.nn.Linear(3 * 14 * 14, 32))
    trainer.fit(ProtoNet(embed), data)
    if trainer.is_global_zero:
        warm = len(clock.times) // 5  # leave out start-up (worker start, first batches)
        seconds = clock.times[-1] - clock.times[warm]
        Path(out).write_text(json.dumps({"episodes_per_s": (len(clock.times) - 1 - warm) * 16 * 2 / seconds}))
    torch.distributed.destroy_process_group()


def run_child(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ddp(root: Path, source: str, steps: int, env: dict) -> dict:
    """Launch the DDP child and sample the private memory of its whole process tree while it trains."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, __file__, "--child", "ddp", str(root), source, str(steps), str(result)],
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, each = 0, []
        while proc.poll() is None:
            sizes = [anonymous_kib(p, "Pss_Anon:") for p in descendants(proc.pid)]
            if sum(sizes) > peak:
                peak, each = sum(sizes), sizes
            time.sleep(0.5)
        if proc.returncode:
            raise SystemExit(proc.stderr.read()[-3000:])
        each = [round(k / 1024) for k in sorted(each, reverse=True) if k > 1024]
        return {**json.loads(result.read_text()), "peak_anon_mib": peak / 1024, "processes": len(each), "each_mib": each}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--side", type=int, default=96, help="side of the generated JPEGs (resized to 84 on load)")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "lightning_meta_bench_images"))
    p.add_argument("--ddp-steps", type=int, default=150)
    p.add_argument("--skip-l2l", action="store_true")
    args = p.parse_args()
    root = Path(args.root) / "data"
    generate(root, args.classes, args.per_class, args.side)
    n = args.classes * args.per_class
    cache = Path(args.root) / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {"LIGHTNING_META_CACHE": str(cache)}

    today = run_child("construct", str(root), "", "0")
    print(f"today (cache=False, serial PIL): {n / today['construct_s']:,.0f} images/s ({today['construct_s']:.1f} s); "
          f"private memory +{today['anon_after_construct_mib']:,.0f} MiB", flush=True)
    first = run_child("construct", str(root), str(cache), "0")
    print(f"first build (parallel, {os.cpu_count()} cores): {n / first['construct_s']:,.0f} images/s "
          f"({first['construct_s']:.1f} s), {n / first['construct_s'] / (n / today['construct_s']):.1f}x today", flush=True)
    hit = run_child("construct", str(root), str(cache), "100")
    print(f"second construction (cache hit): first episode after {hit['first_episode_s']:.2f} s; private memory after "
          f"100 meta-batches +{hit['anon_after_train_mib']:,.0f} MiB (today: +{today['anon_after_construct_mib']:,.0f} "
          "MiB before training)", flush=True)
    files = sorted(cache.glob("*.lmcache"))
    ours = run_ddp(root, "ours", args.ddp_steps, env)
    print(f"2 DDP processes x 2 workers, ProtoNet from the cache: {ours['episodes_per_s']:.1f} episodes/s; "
          f"{len(files)} cache file ({files[0].stat().st_size / 2**30:.2f} GiB); private memory of all "
          f"{ours['processes']} processes together (peak Pss_Anon): {ours['peak_anon_mib']:,.0f} MiB {ours['each_mib']}",
          flush=True)
    if not args.skip_l2l:
        l2l = run_ddp(root, "l2l", max(args.ddp_steps // 10, 10), env)
        print(f"2 DDP processes x 2 workers, learn2learn TaskDataset on the same files: {l2l['episodes_per_s']:.1f} "
              f"episodes/s (the cache: {ours['episodes_per_s'] / l2l['episodes_per_s']:.1f}x its rate); private "
              f"memory (peak) {l2l['peak_anon_mib']:,.0f} MiB {l2l['each_mib']}", flush=True)
    print(f"bytes per meta-batch to the device (4 tasks of 5-way 1-shot 15-query, 84x84 RGB): uint8 "
          f"{hit['bytes_uint8'] / 2**20:.2f} MiB, float32 {hit['bytes_float32'] / 2**20:.2f} MiB "
          f"({hit['bytes_float32'] / hit['bytes_uint8']:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "construct":
            print(json.dumps(child_construct(rest[0], rest[1], int(rest[2]))))
        else:
            child_ddp(rest[0], rest[1], int(rest[2]), rest[3])
    else:
        main()
