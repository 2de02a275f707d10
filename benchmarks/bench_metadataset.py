"""Meta-Dataset records at scale: the two stores' index build, speed and memory, against the PyTorch port's path.

Writes Meta-Dataset sources in the real format (``dataset_spec.json`` + one ``{class_id}.tfrecords`` per class, each
record a ``tf.train.Example`` with ``image`` and ``label``, by ``write_source``) at realistic sizes: 1,000 classes of
84x84 JPEGs (1,000,000 records; and 100,000 and 200,000) and of JPEGs 300-500 px on a side (20,000 records). To write
a million records in seconds, a few hundred distinct JPEGs (smooth gradients + noise, quality 90) are encoded once and
their bytes reused across records. Then, each measurement in a fresh process:

1. **index build** (``MetaDatasetRecords(..., store="encoded")`` with no index in the cache: cold), records evicted
   from the page cache (``posix_fadvise(DONTNEED)``: read from disk) and again with the records in the page cache;
   beside it the port's index tool (``tfrecord.tools.tfrecord2idx.create_index``, one ``.index`` per class file);
2. **speed**: items/s (decode + resize to 84 px, batches of 64 random items) and variable episodes/s
   (``EpisodicDataModule(variable_episodes=VariableEpisodes(), n_way=n_shot=n_query=None, meta_batch_size=1)``) from
   each store with 0 and N DataLoader workers, against the port's path (mboudiaf/pytorch-meta-dataset): one
   ``tfrecord.reader.tfrecord_loader`` stream per class file *with its .index file* (as the port's ``Reader`` opens
   them: it starts at a random record and wraps; all open, as once every class has been drawn), a random class per item
   (its ``BatchDataset``), decoded with
   ``PIL.Image.open(BytesIO(...)).convert("RGB").resize((84, 84))``. Per-core figures are items/s per process that
   decodes (the main process with 0 workers, else each worker). The decoded store is measured on the 200,000-record
   tree (its decoded cache, 4.2 GB, fits the disk budget; its speed does not depend on the record count);
3. **memory**: private memory (USS) and its anonymous part (the heap) of the process that iterates the episodes and of
   each DataLoader worker after ``--memory-episodes`` variable episodes, and their open file descriptors, at 100,000
   and 1,000,000 records (encoded) and 100,000 and 200,000 (decoded), and of the port's processes after its items run.

    python benchmarks/bench_metadataset.py            # the README's table (5-8 minutes on 2 idle cores, 12 GB of disk)
    python benchmarks/bench_metadataset.py --quick    # 20 classes, a minute: a look at the table's shape

Everything is written to a temporary folder removed at the end (``--root`` to choose it, ``--keep`` to keep it; a
kept folder's records are reused by the next run). Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Optional

import numpy as np
from timing import Stopwatch, compare

HERE = Path(__file__).resolve().parent
SIDE = 84
BATCH = 64  # items per batch in the items/s runs
POOL_SIZE = 256  # distinct JPEGs per tree, their bytes reused across records
MB = 2**20


# ------------------------------------------------------------------------------------------------ memory, descriptors
def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """A process's memory in MiB: ``uss`` (psutil's where installed, else the ``Private_*`` lines of
    ``/proc/<pid>/smaps_rollup``: pages no other process maps, file pages included), ``pss_anon`` (its share of the
    anonymous pages: a page a forked worker still shares with its parent counts half in each) and ``anon`` (all its
    anonymous pages, shared copy-on-write ones included: heap, not files)."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {"uss": 0.0, "pss_anon": 0.0, "anon": 0.0}
    uss = sum(v for k, v in fields.items() if k.startswith("Private_")) * 1024
    try:
        import psutil  # type: ignore[import-not-found]

        uss = psutil.Process(os.getpid() if pid == "self" else int(pid)).memory_full_info().uss
    except Exception:  # not installed, or the process is gone
        pass
    return {"uss": uss / MB, "pss_anon": fields.get("Pss_Anon", 0) / 1024, "anon": fields.get("Anonymous", 0) / 1024}


def descriptors(pid: int | str = "self") -> tuple[int, int]:
    """``(open descriptors, of which TFRecord files)`` of a process."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0, 0
    records = 0
    for fd in fds:
        try:
            records += os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".tfrecords")
        except OSError:
            pass
    return len(fds), records


def children(pid: Optional[int] = None) -> set[int]:
    pid = os.getpid() if pid is None else pid
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def process_row(role: str, pid: int | str = "self", imports: float = 0.0) -> dict:
    """Memory and descriptors of a process; ``grown``: its anonymous memory beyond ``imports`` (the main process's
    anonymous MiB after its imports, which a forked worker starts from)."""
    fds, records = descriptors(pid)
    memory = memory_mib(pid)
    return {"process": role, **memory, "grown": memory["anon"] - imports, "fds": fds, "record_fds": records}


# ------------------------------------------------------------------------------------------------ the records
def jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A natural-ish image: smooth coloured waves plus sensor-like noise, as a quality-90 JPEG."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    f, phase = rng.uniform(1, 6, (3, 3)), rng.uniform(0, 2 * np.pi, 3)
    waves = [np.sin(f[c, 0] * xx + f[c, 1] * yy + phase[c]) * np.cos(f[c, 2] * (xx - yy)) for c in range(3)]
    pixels = (np.stack(waves, -1) * 0.35 + 0.5) * 255 + rng.normal(0, 10, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_pool(large: bool, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [jpeg(rng, *(rng.integers(300, 501, 2) if large else (SIDE, SIDE))) for _ in range(POOL_SIZE)]


_POOLS: dict[bool, list[bytes]] = {}


def _set_pools(pools: dict[bool, list[bytes]]) -> None:
    _POOLS.update(pools)


def _write_classes(job: tuple[str, dict, list[int], bool]) -> int:
    from lightning_meta.data.datasets.metadataset import write_source

    root, spec, classes, large = job
    pool = _POOLS[large]
    return write_source(root, spec, lambda c, i: pool[(c * 7919 + i * 104729) % len(pool)], classes=classes)


def spec_of(name: str, classes: int, per_class: int) -> dict:
    return {"__class__": "DatasetSpecification", "name": name,
            "classes_per_split": {"TRAIN": classes, "VALID": 0, "TEST": 0},
            "images_per_class": {str(c): per_class for c in range(classes)},
            "class_names": {str(c): f"n{c:08d}" for c in range(classes)}, "path": "", "file_pattern": "{}.tfrecords"}


def write_trees(trees: dict[Path, tuple[int, int, bool]], workers: int) -> dict[Path, dict]:
    """Write the sources ``{folder: (classes, per class, large JPEGs)}`` (all classes in the train split) with one pool
    of processes; a kept folder's complete trees are reused."""
    todo = {folder: tree for folder, tree in trees.items() if not (folder / ".complete").exists()}
    if todo:
        import lightning_meta.data.datasets.metadataset  # noqa: F401  (imported once here, not in every forked writer)

        pools = {large: jpeg_pool(large, seed=int(large)) for large in {t[2] for t in todo.values()}}
        jobs = []
        for folder, (classes, per_class, large) in todo.items():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            spec = spec_of(folder.name, classes, per_class)
            step = min(classes, workers * 4)
            jobs += [(str(folder), spec, list(range(c, classes, step)), large) for c in range(step)]
        with Pool(workers, initializer=_set_pools, initargs=(pools,)) as p, Stopwatch() as clock:
            p.map(_write_classes, jobs, chunksize=1)
        os.sync()  # on disk, so that evicting the pages later makes the next read come from the disk
        for folder, (classes, per_class, large) in todo.items():
            info = {"records": classes * per_class, "jpeg_bytes": float(np.mean([len(b) for b in pools[large]])),
                    "file_bytes": sum(f.stat().st_size for f in folder.glob("*.tfrecords")), "write_s": clock.wall}
            (folder / ".complete").write_text(json.dumps(info))
    return {folder: json.loads((folder / ".complete").read_text()) for folder in trees}


def evict(folder: Path) -> None:
    """Drop a tree's record files from the page cache (no root needed for clean pages): the next read is the disk's."""
    for path in folder.glob("*.tfrecords"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------ child: index build
def child_index(tree: str, cache: str, scratch: str, port_index: str) -> dict:
    """Build our index cold (no index in ``cache``) from the disk and from the page cache, and the port's .index files
    (tfrecord2idx) likewise."""
    from tfrecord.tools.tfrecord2idx import create_index

    from lightning_meta.data import MetaDatasetRecords

    folder = Path(tree)
    files = sorted(folder.glob("*.tfrecords"), key=lambda p: int(p.stem))
    out: dict[str, float] = {}

    def ours(where: str) -> float:
        with Stopwatch() as clock:
            ds = MetaDatasetRecords(folder, "train", store="encoded", cache=where)
        out["records"] = len(ds)
        return clock.wall

    def port(where: Path) -> float:
        where.mkdir(parents=True, exist_ok=True)
        with Stopwatch() as clock:
            for f in files:
                create_index(str(f), str(where / f"{f.stem}.index"))
        return clock.wall

    evict(folder)
    out["ours_disk_s"] = ours(cache)  # the shared cache (emptied at the start of the run): the runs below use it
    shutil.rmtree(scratch, ignore_errors=True)
    out["ours_cached_s"] = ours(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    evict(folder)
    out["port_disk_s"] = port(Path(scratch))
    shutil.rmtree(scratch, ignore_errors=True)
    out["port_cached_s"] = port(Path(port_index))  # kept: the port's reader below needs them
    return out


# ------------------------------------------------------------------------------------------------ child: speed
def _steady(it: Any, prefetched: int, batches: int) -> float:
    """Seconds for ``batches`` batches of a running iterator, after taking (untimed) the ``prefetched`` batches its
    workers made while other contenders ran: the window then starts and ends with the workers busy."""
    for _ in range(prefetched):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def calibrated(run: Callable[[int], float], seconds: float) -> Callable[[], float]:
    """A contender for :func:`compare`: its first call (the warm-up round) times 2 batches and sets the batches per
    round so that a round takes about ``seconds``; it reports seconds per batch."""
    state: dict[str, int] = {}

    def call() -> float:
        if "n" not in state:
            per = run(2) / 2
            state["n"] = max(2, math.ceil(seconds / max(per, 1e-6)))
            return per
        return run(state["n"]) / state["n"]

    return call


class RandomItems:
    """Batches of ``BATCH`` random items of a dataset's store (``gather``), forever; in workers, each its own seed."""

    def __init__(self, ds: Any, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        while True:
            yield self.ds.gather(torch.from_numpy(rng.integers(0, len(self.ds), BATCH)))


class PortItems:
    """The port's path: a ``tfrecord_loader`` stream per class file with its ``.index`` file (started at a random
    record, wrapping), a random class per item, PIL decode + ``resize((84, 84))``; batches of ``BATCH`` as ``uint8
    [BATCH, 3, 84, 84]`` (the same output as our stores, before the port's ToTensor)."""

    def __init__(self, files: list[str], indexes: list[str], seed: int) -> None:
        self.files, self.indexes, self.seed = files, indexes, seed

    def __iter__(self):
        import torch
        from PIL import Image
        from tfrecord.reader import tfrecord_loader
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, wid, 7])
        np.random.seed(self.seed + wid)  # the tfrecord reader draws each stream's start from numpy's global generator
        description = {"image": "byte", "label": "int"}

        def stream(c: int) -> Any:
            return iter(tfrecord_loader(self.files[c], self.indexes[c], description))

        # every class's stream open, as in the port once each class has been drawn (its steady state): open files,
        # read buffers and index loading are then not part of the timed rounds
        streams = [stream(c) for c in range(len(self.files))]
        pending = [next(s) for s in streams]
        while True:
            out = np.empty((BATCH, SIDE, SIDE, 3), dtype=np.uint8)
            for row in range(BATCH):
                c = int(rng.integers(len(self.files)))
                record = pending[c]
                try:
                    pending[c] = next(streams[c])
                except StopIteration:  # wrap around: the port cycles through its class files
                    streams[c] = stream(c)
                    pending[c] = next(streams[c])
                image = Image.open(io.BytesIO(record["image"])).convert("RGB").resize((SIDE, SIDE))
                out[row] = np.asarray(image)
            yield torch.from_numpy(out).permute(0, 3, 1, 2)


def _iterable(source: Any):
    from torch.utils.data import IterableDataset

    class Wrapped(IterableDataset):
        def __iter__(self):
            return iter(source)

    return Wrapped()


def child_speed(spec: str) -> dict:
    """Items/s, then variable episodes/s, of the contenders in ``spec`` (JSON: ``contenders`` as ``[name, kind, tree,
    store]``, ``workers``, ``rounds``, ``seconds``, ``cache``, ``port_index``), each with 0 and N workers; and the
    private memory and descriptors of the port's processes after its items run."""
    import torch
    from torch.utils.data import DataLoader

    from lightning_meta import EpisodicDataModule
    from lightning_meta.data import MetaDatasetRecords, VariableEpisodes

    torch.set_num_threads(1)  # 0 workers: one decoding core
    imports = memory_mib()["anon"]
    args = json.loads(spec)
    counts = sorted({0, args["workers"]})
    datasets: dict[tuple[str, str], Any] = {}
    build: dict[str, float] = {}

    def dataset(tree: str, store: str) -> Any:
        if (tree, store) not in datasets:
            with Stopwatch() as clock:
                datasets[tree, store] = MetaDatasetRecords(tree, "train", store=store, cache=args["cache"])
            build[f"{Path(tree).name}/{store}"] = clock.wall
        return datasets[tree, store]

    # items/s: every contender's loader running at once, taking turns (idle workers wait on a full prefetch queue)
    item_runs: dict[str, Callable[[], float]] = {}
    loaders: list[Any] = []
    port_pids: dict[str, set[int]] = {}
    for name, kind, tree, store in args["contenders"]:
        if kind == "port":
            files = sorted(Path(tree).glob("*.tfrecords"), key=lambda p: int(p.stem))
            index = Path(args["port_index"]) / Path(tree).name
            source: Any = PortItems([str(f) for f in files], [str(index / f"{f.stem}.index") for f in files], 0)
        else:
            source = RandomItems(dataset(tree, store), 0)
        for workers in counts:
            label = f"{name}|{workers}"
            before = children()
            if workers:
                it = iter(DataLoader(_iterable(source), batch_size=None, num_workers=workers))
                next(it)  # the workers are up
            else:
                it = iter(source)
            port_pids[label] = children() - before if kind == "port" else set()
            loaders.append(it)
            item_runs[label] = calibrated(lambda n, it=it, w=workers: _steady(it, 2 * w, n), args["seconds"])
    items = compare(item_runs, rounds=args["rounds"], warmup=1)
    # the port's workers (forked before our datasets were built; the main process holds every contender's state)
    memory = [process_row(f"worker {k}", pid, imports) for label, pids in port_pids.items()
              for k, pid in enumerate(sorted(pids))]
    del loaders, item_runs  # their workers exit

    # variable episodes/s from our stores
    episode_runs: dict[str, Callable[[], float]] = {}
    sizes: dict[str, list[int]] = {}
    streams = []
    for name, kind, tree, store in args["contenders"]:
        if kind == "port":
            continue
        for workers in counts:
            label = f"{name}|{workers}"
            data = EpisodicDataModule(train=dataset(tree, store), n_way=None, n_shot=None, n_query=None,
                                      meta_batch_size=1, variable_episodes=VariableEpisodes(), train_episodes=10**6,
                                      num_workers=workers, seed=0)
            data.setup("fit")
            episodes = iter(data.train_dataloader())
            streams.append(episodes)
            seen = sizes[label] = []

            def pull(n: int, episodes=episodes, w=workers, seen=seen) -> float:
                for _ in range(2 * w):  # made by the workers while the others ran: untimed
                    next(episodes)
                start = time.perf_counter()
                for _ in range(n):
                    batch = next(episodes)
                    seen.append(int(batch.support_x.shape[-4] + batch.query_x.shape[-4]))
                return time.perf_counter() - start

            episode_runs[label] = calibrated(pull, args["seconds"])
    episodes_ = compare(episode_runs, rounds=args["rounds"], warmup=1)
    results = {}
    for label in items:
        row = {"items_per_s": BATCH / items.median(label), "item_rounds": [BATCH / t for t in items[label]]}
        if label in episode_runs:
            row["episodes_per_s"] = 1 / episodes_.median(label)
            row["images_per_episode"] = float(np.mean(sizes[label]))
        results[label] = row
    return {"speed": results, "build_s": build, "port_memory": memory}


# ------------------------------------------------------------------------------------------------ child: memory
def child_memory(tree: str, store: str, cache: str, workers: int, episodes: int) -> dict:
    """Private memory and descriptors of the main process and each worker after ``episodes`` variable episodes."""
    import torch

    from lightning_meta import EpisodicDataModule
    from lightning_meta.data import MetaDatasetRecords, VariableEpisodes

    torch.set_num_threads(1)
    imports = memory_mib()
    ds = MetaDatasetRecords(tree, "train", store=store, cache=cache)
    data = EpisodicDataModule(train=ds, n_way=None, n_shot=None, n_query=None, meta_batch_size=1,
                              variable_episodes=VariableEpisodes(), train_episodes=10**6, num_workers=workers, seed=0)
    data.setup("fit")
    before = children()
    it = iter(data.train_dataloader())
    for _ in range(episodes):
        next(it)
    rows = [process_row("main", "self", imports["anon"])]
    rows += [process_row(f"worker {k}", pid, imports["anon"]) for k, pid in enumerate(sorted(children() - before))]
    return {"records": len(ds), "rows": rows, "imports": imports}


# ------------------------------------------------------------------------------------------------ the parent
def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    import PIL
    import torch
    import torchvision

    return (f"{len(os.sched_getaffinity(0))} cores available ({os.cpu_count()} logical), {model}; "
            f"{shutil.disk_usage(tempfile.gettempdir()).free / 2**30:.0f} GiB free; torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}")


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:5.0f} s] {message}", file=sys.stderr, flush=True)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1000, help="records per class of the big 84 px tree")
    p.add_argument("--small-per-class", type=int, default=100, help="the 84 px tree of the memory's small point")
    p.add_argument("--decoded-per-class", type=int, default=200,
                   help="the 84 px tree the decoded store is measured on (its cache: classes x this x 21 KB)")
    p.add_argument("--large-per-class", type=int, default=20, help="records per class of the 300-500 px tree")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="N, the DataLoader workers")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-seconds", type=float, default=1.0, help="about how long a timed round of a contender takes")
    p.add_argument("--memory-episodes", type=int, default=100)
    p.add_argument("--root", default=None, help="the working folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder (records reused by the next run)")
    p.add_argument("--quick", action="store_true", help="20 classes of 200/50/100/5 records, short rounds")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; sizes given on the command line still win
        p.set_defaults(classes=20, per_class=200, small_per_class=50, decoded_per_class=100, large_per_class=5,
                       memory_episodes=10, rounds=2, round_seconds=0.3)
        args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    root = Path(args.root or tempfile.mkdtemp(prefix="lightning_meta_bench_md_"))
    try:
        report(args, root, command)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def report(args: argparse.Namespace, root: Path, command: str) -> None:
    c, n = args.classes, args.workers
    started = time.perf_counter()
    records, cache, port_index = root / "records", root / "cache", root / "port-index"
    trees = {f"md84-{c}x{k}": (k, False) for k in sorted({args.per_class, args.small_per_class, args.decoded_per_class})}
    trees[f"mdlarge-{c}x{args.large_per_class}"] = (args.large_per_class, True)
    big, small, dec, large = (f"md84-{c}x{args.per_class}", f"md84-{c}x{args.small_per_class}",
                              f"md84-{c}x{args.decoded_per_class}", f"mdlarge-{c}x{args.large_per_class}")
    shutil.rmtree(cache, ignore_errors=True)  # cold: no index, no decoded cache (records of a kept folder are reused)
    written = write_trees({records / name: (c, k, is_large) for name, (k, is_large) in trees.items()}, n)
    info = {folder.name: value for folder, value in written.items()}
    log(f"records written in {max(v['write_s'] for v in info.values()):.0f} s: "
        + ", ".join(f"{k} {v['file_bytes'] / 2**30:.2f} GiB" for k, v in info.items()))

    index = {}
    for name in (big, large):  # (the other trees are indexed when first constructed below)
        index[name] = run_child("index", str(records / name), str(cache), str(root / "scratch"), str(port_index / name))
        log(f"index {name}: {index[name]}")

    speed_spec = {"workers": n, "rounds": args.rounds, "seconds": args.round_seconds, "cache": str(cache),
                  "port_index": str(port_index)}
    speed84 = run_child("speed", json.dumps({**speed_spec, "contenders": [
        ["port (tfrecord + PIL)", "port", str(records / big), ""],
        ["encoded", "ours", str(records / big), "encoded"],
        ["decoded", "ours", str(records / dec), "decoded"]]}))
    log(f"speed 84 px: {speed84['speed']}")
    speed_large = run_child("speed", json.dumps({**speed_spec, "contenders": [
        ["port (tfrecord + PIL)", "port", str(records / large), ""],
        ["encoded", "ours", str(records / large), "encoded"]]}))
    log(f"speed 300-500 px: {speed_large['speed']}")

    memory = []
    for store, name in (("encoded", small), ("encoded", big), ("decoded", small), ("decoded", dec)):
        result = run_child("memory", str(records / name), store, str(cache), str(n), str(args.memory_episodes))
        memory.append((store, result))
        log(f"memory {store} {name}: {result}")
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    elapsed = time.perf_counter() - started

    out = [f"`{command}`", "", f"Machine: {machine()}. Took {elapsed / 60:.1f} min; {disk / 2**30:.1f} GiB written "
           f"({'kept: --keep' if args.keep else 'removed at the end'}).", ""]
    out += ["Records: Meta-Dataset's format (`dataset_spec.json` + one `.tfrecords` per class, `tf.train.Example` "
            "records), written by `write_source`; each tree reuses the bytes of "
            f"{POOL_SIZE} distinct JPEGs (smooth waves + noise, quality 90), encoded once.", ""]
    out += ["| tree | classes | records | image | mean JPEG bytes | mean bytes per record (framed) |",
            "|---|--:|--:|---|--:|--:|"]
    for name, (_, is_large) in trees.items():
        t = info[name]
        out.append(f"| {name} | {c:,} | {t['records']:,} | {'300-500 px' if is_large else '84x84'} | "
                   f"{fmt(t['jpeg_bytes'])} | {fmt(t['file_bytes'] / t['records'])} |")

    out += ["", "**1. Index build** (first construction, no index in the cache; `MetaDatasetRecords(store='encoded')`, "
            "against the port's `tfrecord2idx.create_index` per class file). *Disk*: the records evicted from the page "
            "cache first (`posix_fadvise(DONTNEED)`); *page cache*: read again.", "",
            "| tree | records | reader | records in | seconds | records/s | s per million |", "|---|--:|---|---|--:|--:|--:|"]
    for name, r in index.items():
        for who, key in (("ours", "ours"), ("port: tfrecord2idx", "port")):
            for where, suffix in (("disk", "disk_s"), ("page cache", "cached_s")):
                s = r[f"{key}_{suffix}"]
                out.append(f"| {name} | {int(r['records']):,} | {who} | {where} | {s:.2f} | {fmt(r['records'] / s)} | "
                           f"{s / r['records'] * 1e6:.1f} |")

    out += ["", f"**2. Speed** (decode + resize to 84 px; batches of {BATCH} random items; variable episodes: "
            "`VariableEpisodes()` defaults, meta-batch 1; median of "
            f"{args.rounds} rounds after a warm-up round). Per core: items/s per decoding process (the main process "
            f"with 0 workers, else each of the {n} workers). The decoded store on the {dec} tree (its cache: "
            f"{info[dec]['records'] * 3 * SIDE * SIDE / 2**30:.1f} GiB; sampling speed does not depend on the record "
            "count). The port's path: `tfrecord.reader.tfrecord_loader` per class file with its `.index` file (built "
            "above by `tfrecord2idx`), PIL `Image.open(BytesIO).convert('RGB').resize((84, 84))` (bicubic; ours: "
            "Lanczos, after libjpeg's 1/2-1/8 scaling for JPEGs 4x the target or more; no CRC check there, CRC + "
            "label check in ours).", "",
            "| tree | path | workers | items/s | items/s per core | per core vs port | variable episodes/s | "
            "images per episode |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    checks = []
    for tree_name, result in ((big, speed84), (large, speed_large)):
        rows = result["speed"]
        for label, row in rows.items():
            name, workers = label.split("|")
            per_core = row["items_per_s"] / max(int(workers), 1)
            port = rows[f"port (tfrecord + PIL)|{workers}"]
            vs = per_core / (port["items_per_s"] / max(int(workers), 1))
            shown = dec if name == "decoded" else tree_name
            eps = f"{row['episodes_per_s']:.2f}" if "episodes_per_s" in row else "-"
            ipe = fmt(row["images_per_episode"]) if "images_per_episode" in row else "-"
            out.append(f"| {shown} | {name} | {workers} | {fmt(row['items_per_s'])} | {fmt(per_core)} | {vs:.2f}x | "
                       f"{eps} | {ipe} |")
            if name == "encoded":
                checks.append(f"encoded >= port per core ({shown}, {workers} workers): {vs:.2f}x "
                              f"{'(met)' if vs >= 1 else '(NOT met)'}")
            if name == "decoded":
                enc = rows[f"encoded|{workers}"]
                x, e = row["items_per_s"] / enc["items_per_s"], row["episodes_per_s"] / enc["episodes_per_s"]
                checks.append(f"decoded >= 10x encoded ({workers} workers): items {x:.1f}x, episodes {e:.1f}x "
                              f"{'(met)' if min(x, e) >= 10 else '(NOT met)'}")
        best = {store: max((r["episodes_per_s"], label.split("|")[1]) for label, r in rows.items()
                           if label.startswith(store + "|")) for store in ("encoded", "decoded") if f"{store}|0" in rows}
        if len(best) == 2:
            (d, dw), (e, ew) = best["decoded"], best["encoded"]
            checks.append(f"decoded >= 10x encoded, each with its best worker count: {d:.1f} episodes/s ({dw} workers) "
                          f"against {e:.2f} ({ew} workers), {d / e:.1f}x {'(met)' if d >= 10 * e else '(NOT met)'}")

    imports = memory[0][1]["imports"]
    out += ["", f"**3. Memory** after {args.memory_episodes} variable episodes with {n} workers, per process. USS: "
            "pages no other process maps (file pages of the memory-mapped index or decoded cache included while only "
            "that process maps them; the pages a forked worker shares with its parent excluded from both). Pss_Anon: "
            "its share of the anonymous memory (a sum over processes counts each page once). Grown: anonymous MiB "
            f"beyond the main process's after its imports (torch, lightning_meta: {imports['anon']:.0f} MiB anonymous, "
            f"USS {imports['uss']:.0f} MiB, before any dataset), i.e. what the data path added. "
            "Open descriptors: all, and TFRecord files among them. The port's workers: after its items run above "
            "(one open stream per class, each a file and a 1 MiB read buffer).", "",
            "| store | records | process | USS MiB | Pss_Anon MiB | grown MiB | open fds | record files open |",
            "|---|--:|---|--:|--:|--:|--:|--:|"]

    def line(store: str, records: int, row: dict) -> str:
        return (f"| {store} | {records:,} | {row['process']} | {row['uss']:.0f} | {row['pss_anon']:.0f} | "
                f"{row['grown']:+.0f} | {row['fds']} | {row['record_fds']} |")

    worst, grown = 0.0, 0.0
    for store, result in memory:
        for row in result["rows"]:
            out.append(line(store, result["records"], row))
            if result["records"] == info[big]["records"]:
                worst, grown = max(worst, row["uss"]), max(grown, row["grown"])
    out += [line("port (tfrecord + PIL)", info[big]["records"], row) for row in speed84["port_memory"]]
    checks.append(f"private memory per process at {info[big]['records']:,} records (encoded, {n} workers): USS at most "
                  f"{worst:.0f} MiB, anonymous growth at most {grown:.0f} MiB "
                  f"{'(met: < 300 MB)' if max(worst, grown) * MB < 300e6 else '(NOT met: 300 MB)'}")
    builds = {**speed84["build_s"], **speed_large["build_s"]}
    decoded_build = builds.get(f"{dec}/decoded")
    if decoded_build:
        out += ["", f"First construction of the decoded store of {dec} (its index, then decoding "
                f"{info[dec]['records']:,} images with {n} processes): "
                f"{decoded_build:.1f} s ({fmt(info[dec]['records'] / decoded_build)} images/s)."]
    out += ["", "Targets: " + "; ".join(checks) + "."]
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "index":
            result = child_index(*rest)
        elif kind == "speed":
            result = child_speed(rest[0])
        else:
            result = child_memory(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
        print(json.dumps(result))
    else:
        main()
