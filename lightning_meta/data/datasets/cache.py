"""The decoded-image cache: one memory-mapped ``uint8`` file per dataset and size, shared by every process on a machine.

A dataset lists its images in order (each file's path, size, modification and change times and inode: no decoding),
derives a key from that list and its decoding options, and maps ``<cache_dir>/<Kind>-<H>x<W>-<key>.lmcache``. The first
process to get there decodes the images, in parallel over the cores, into a temporary file, checks it and renames it
into place, holding a lock file so that processes starting at the same time wait for it instead of decoding again;
every later process (each DDP rank, each DataLoader worker, each run) maps the finished file read-only. The operating
system's page cache then holds one copy of the images for all of them, and a process's private memory does not grow
with the dataset. The decode workers never hold the lock and die with the builder, so a killed build (SIGKILL, the OOM
killer) leaves only a temporary file, which the next builder removes; the lock file is removed with the lock.

File layout: a 4096-byte header (a magic line, then JSON: format, key, shape) followed by the images ``[n, C, H, W]``
in C order. A changed source or option gives another key, hence another file (:func:`prune_cache` removes the unused
ones); a file that is truncated, foreign, holds another key or a shape other than the dataset's is named in an error
that says how to fix it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

MAGIC = b"lightning-meta image cache\n"
HEADER = 4096
FORMAT = 1
ENV = "LIGHTNING_META_CACHE"
PARALLEL_FROM = 256  # fewer images decode in the calling process (a worker pool costs more than it saves)

CacheArg = Union[bool, str, Path]
SUFFIXES = (".lmcache", ".lmindex")  # the decoded store's image files; the encoded store's indexes and packs
log = logging.getLogger("lightning_meta.data")


def _info(message: str) -> None:
    """Log ``message`` so that it is seen by default, as Lightning's own messages are: the package's logger at INFO,
    and a handler to stderr where none is configured."""
    package = logging.getLogger("lightning_meta")
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    if not log.hasHandlers():
        package.addHandler(logging.StreamHandler())
    log.info(message)


def default_cache_dir() -> Path:
    """``$LIGHTNING_META_CACHE``, else ``$XDG_CACHE_HOME/lightning_meta/images`` (``~/.cache/...``)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lightning_meta" / "images"


def cache_dir_of(cache: CacheArg) -> Optional[Path]:
    """The folder a dataset's ``cache`` argument names: ``True`` the default, a path that folder, ``False`` none."""
    if cache is False or cache is None:
        return None
    if cache is True:
        return default_cache_dir()
    if isinstance(cache, (str, os.PathLike)):
        return Path(cache)
    raise TypeError(f"Expected `cache` to be True, False or a folder path, but got {type(cache).__name__}.")


def file_fingerprint(paths: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """``(path, size, mtime_ns, ctime_ns, inode)`` of every file, in the order given (a repeated path repeats): what the
    key of a cache built from them depends on. The change time covers a file rewritten to the same size with its
    modification time put back (``touch -r``): the kernel sets it on every change and no call sets it back; the inode
    covers a file replaced by another one renamed into place. (A content hash would cover more, but reads every byte
    at every construction: 6.5x the cost of these ``stat`` calls on 10,000 files of 7.7 KB, and ImageNet's 140 GB at
    disk speed.) A symbolic link is followed to its file."""
    seen: dict[str, os.stat_result] = {}
    out = []
    for p in paths:
        st = seen.get(p)
        if st is None:
            try:
                st = seen[p] = os.stat(p)
            except OSError as err:
                raise ValueError(f"Cannot read the image file {p} ({err}): restore it, or leave it out of the "
                                 "dataset.") from err
        out.append((p, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return out


def cache_key(kind: str, options: dict[str, Any], sources: Any) -> str:
    """A digest of everything the decoded images depend on: the dataset kind, its decoding options and its sources
    (e.g. :func:`file_fingerprint`)."""
    text = json.dumps({"format": FORMAT, "kind": kind, "options": options, "sources": sources}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class CacheFile:
    """Where a dataset's images are mapped from, whether this process built the file (``built``), and the key and
    shape ``[n, C, H, W]`` it must hold (checked again when a pickled dataset maps it)."""

    path: Path
    built: bool
    key: Optional[str] = None
    shape: Optional[tuple[int, ...]] = None

    def __repr__(self) -> str:
        return f"CacheFile({str(self.path)!r}, built={self.built})"


def _header(key: str, shape: tuple[int, ...]) -> bytes:
    meta = json.dumps({"format": FORMAT, "key": key, "shape": list(shape), "dtype": "uint8"}).encode()
    head = MAGIC + meta + b"\n"
    if len(head) > HEADER:
        raise ValueError("image cache header too long")
    return head.ljust(HEADER, b"\0")


def _fix(path: Path) -> str:
    return f"Delete {path} (a new one is built on the next construction), or pass another `cache` folder."


def _unwritable(action: str, folder: Path, err: OSError) -> str:
    return (f"Cannot {action} the image cache folder {folder} ({err}): pass `cache=` a writable folder (or set ${ENV}), "
            "or `cache=False` to decode into this process's memory.")


def read_cache(path: Path, key: Optional[str] = None, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Map a finished cache file read-only (copy-on-write, so it is shared, never written): ``uint8 [n, C, H, W]``.
    Raises a ``ValueError`` naming the file and the fix when it is not a whole cache of ``key`` holding images of
    ``shape`` (the dataset's ``[n, C, H, W]``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError as err:
        raise ValueError(f"Cannot read the image cache {path}: {err}. {_fix(path)}") from err
    if not head.startswith(MAGIC):
        raise ValueError(f"{path} is not a lightning-meta image cache (it does not start with the cache's header). "
                         + _fix(path))
    try:
        meta = json.loads(head[len(MAGIC):].split(b"\n", 1)[0])
        found = meta["shape"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"The image cache {path} has a damaged header ({err}). {_fix(path)}") from err
    if not (isinstance(found, list) and len(found) == 4 and all(type(s) is int and s >= 0 for s in found)):
        raise ValueError(f"The image cache {path} has a damaged header: its shape {found} is not four sizes >= 0 "
                         f"[n, C, H, W]. {_fix(path)}")
    if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
        raise ValueError(f"The image cache {path} was written for other images (format {meta.get('format')}, key "
                         f"{meta.get('key')}; expected {FORMAT}, {key}). {_fix(path)}")
    if shape is not None and found != list(shape):
        raise ValueError(f"The image cache {path} holds images of shape {found}, but the dataset has {list(shape)} "
                         f"([n, C, H, W]). {_fix(path)}")
    expected = HEADER + math.prod(found)  # Python integers: no overflow
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"The image cache {path} is truncated or damaged: {size} bytes where {found} images need "
                         f"{expected}. {_fix(path)}")
    return _map(path, tuple(found))


MADV_POPULATE_READ = 22  # Linux 5.14+: fill the page table from the page cache, without copying any page


def _map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The images of a cache file, mapped copy-on-write (nothing is ever written back; reading costs no private
    memory). Where the file fits in half the machine's memory, the mapping's page table is filled at once
    (``MADV_POPULATE_READ``): an episode's random rows then cost no page faults (7 ms -> 3 ms for 320 images here)."""
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE: copy-on-write
    size = int(np.prod(shape))
    if hasattr(buffer, "madvise") and HEADER + size < _memory() // 2:
        with contextlib.suppress(OSError):  # older kernels: pages are mapped on first touch instead
            buffer.madvise(MADV_POPULATE_READ)
    return np.frombuffer(buffer, dtype=np.uint8, count=size, offset=HEADER).reshape(shape)


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


_HELD: set[int] = set()  # descriptors of the lock files this process holds (or waits on)


def _drop_held_locks() -> None:
    """In a forked child: let go of the parent's lock files. A ``flock`` belongs to the open file, which a child
    shares: a child that outlived a killed parent would keep every later build waiting. Its descriptor is pointed at
    ``/dev/null`` rather than closed, so the number stays valid for code that closes it later."""
    if _HELD:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _HELD:
            os.dup2(null, fd, inheritable=False)
        os.close(null)
        _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks)


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock held by one process at a time (released by the kernel if the process dies; never held by
    its forked children). The lock file is removed on release, so none is left behind: a process that waited on the
    removed file sees that and locks the new one."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): concurrent first builds may both decode, the rename stays atomic
        yield
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ValueError(_unwritable("write to", lock.parent, err)) from err
        _HELD.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):  # gone: its holder removed it after we opened it
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
        except BaseException:
            _HELD.discard(fd)
            os.close(fd)
            raise
        _HELD.discard(fd)
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while held: a waiter notices and retries on a new file
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------- building
# A build fills rows of a memory-mapped temporary file. ``decode(i) -> uint8 [H, W, C]`` must be a picklable callable
# (a module-level function or an object of one) when more than one worker decodes.

def _decode_rows(out: np.ndarray, decode: Callable[[int], np.ndarray], start: int, stop: int) -> int:
    shape = out.shape
    for i in range(start, stop):
        image = decode(i)
        if image.shape != (shape[2], shape[3], shape[1]):
            raise ValueError(_shape_error(decode, i, image.shape, shape))
        out[i] = image.transpose(2, 0, 1)
    return stop - start


_DECODER: Optional[Callable[[int], np.ndarray]] = None  # a pool worker's decoder, set once when it starts
PR_SET_PDEATHSIG = 1


def _start_worker(decode: Callable[[int], np.ndarray], parent: int) -> None:
    """A decode worker's start: keep the decoder, and die with the builder that started it (Linux: the kernel sends
    SIGKILL when the parent dies; everywhere: a thread that watches the parent's pid), so a killed builder leaves no
    process decoding into a file nobody will read."""
    global _DECODER
    _DECODER = decode
    with contextlib.suppress(Exception):  # not Linux, or no libc to ask: the watchdog below covers it
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="lightning-meta-parent-watch", daemon=True).start()


def _fill(path: str, shape: tuple[int, ...], start: int, stop: int) -> int:
    out = np.memmap(path, dtype=np.uint8, mode="r+", offset=HEADER, shape=shape)
    if _DECODER is None:  # the pool's initializer sets it before any task runs
        raise RuntimeError("A decode worker received rows before its decoder.")
    done = _decode_rows(out, _DECODER, start, stop)
    out.flush()
    return done


def _shape_error(decode: Callable[[int], np.ndarray], i: int, got: tuple[int, ...], shape: tuple[int, ...]) -> str:
    namer = getattr(decode, "name", None)
    name = namer(i) if callable(namer) else f"Image {i}"
    return (f"Images differ in size: {name} is {got[1]}x{got[0]} with {got[2]} channel(s), but the first is "
            f"{shape[3]}x{shape[2]} with {shape[1]}: pass `image_size` to resize them all to one size.")


def _workers(requested: Optional[int]) -> int:
    if requested is not None:
        return max(1, int(requested))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr)


def build(path: Path, key: str, shape: tuple[int, ...], decode: Callable[[int], np.ndarray], decoded: Optional[int] = None,
          finish: Optional[Callable[[np.ndarray], None]] = None, workers: Optional[int] = None,
          desc: str = "decoding") -> None:
    """Decode images ``0 .. decoded-1`` (default: all ``shape[0]``) into ``path``: a temporary file first, renamed
    when whole. ``finish(images)`` may complete the other rows (e.g. rotated copies) before the file is checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        try:
            header = open(tmp, "wb")
        except OSError as err:
            raise ValueError(_unwritable("write to", path.parent, err)) from err
        with header:
            header.write(_header(key, shape))
            header.truncate(HEADER + int(np.prod(shape)))
        n = shape[0] if decoded is None else decoded
        workers = min(_workers(workers), max(1, n // 64))
        with _progress(n, desc) as bar:
            if workers == 1 or n < PARALLEL_FROM:
                out = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER, shape=shape)
                step = max(1, n // 100)
                for start in range(0, n, step):
                    done = _decode_rows(out, decode, start, min(n, start + step))
                    if bar is not None:
                        bar.update(done)
                out.flush()
                del out
            else:
                context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                      else "spawn")
                chunk = max(16, min(2048, n // (workers * 8)))
                # the decoder reaches each worker once, when it starts (inherited, not pickled, where processes fork)
                with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                         initargs=(decode, os.getpid())) as pool:
                    jobs = [pool.submit(_fill, str(tmp), shape, s, min(n, s + chunk)) for s in range(0, n, chunk)]
                    try:
                        for job in jobs:
                            done = job.result()
                            if bar is not None:
                                bar.update(done)
                    except BaseException:  # a broken image is named now, not after every other image has decoded
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
        if finish is not None:
            images = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER, shape=shape)
            finish(images)
            images.flush()
            del images
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        read_cache(tmp, key, shape)  # whole and readable, or raise before the rename
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_path(cache_dir: Union[str, os.PathLike], kind: str, key: str, shape: tuple[int, ...]) -> Path:
    """The decoded-image cache file of ``key`` in ``cache_dir``."""
    return Path(cache_dir) / f"{kind}-{shape[2]}x{shape[3]}-{key}.lmcache"


def _temporaries(path: Path) -> list[Path]:
    """The temporary files of builds of ``path`` (``<name>.<pid>.tmp``): one in progress, or one that was killed."""
    return list(path.parent.glob(f"{path.name}.*.tmp"))


def started(path: Path) -> bool:
    """Whether the cache file ``path`` is there, or a process is building it (or was, and was killed)."""
    return path.exists() or bool(_temporaries(path))


def build_once(path: Path, build: Callable[[], None]) -> bool:
    """Make ``path`` by ``build()`` unless it is there: one process builds while the others wait on a lock file and
    then use what it built; temporary files of a build that was killed are removed first. Whether this call built it.
    (The decoded store's cache files and the encoded store's indexes and packs.)"""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(_unwritable("create", path.parent, err)) from err
    if path.exists():
        return False
    with _locked(path.with_name(path.name + ".lock")):
        if path.exists():
            return False
        for stale in _temporaries(path):  # a killed build (we hold the lock)
            stale.unlink(missing_ok=True)
        build()
        return True


def open_or_build(cache_dir: Path, kind: str, key: str, shape: tuple[int, ...], decode: Callable[[int], np.ndarray],
                  decoded: Optional[int] = None, finish: Optional[Callable[[np.ndarray], None]] = None,
                  workers: Optional[int] = None) -> tuple[np.ndarray, CacheFile]:
    """Map the cache of ``key`` in ``cache_dir``, building it first when no process has (:func:`build_once`)."""
    path = cache_path(cache_dir, kind, key, shape)

    def make() -> None:
        _info(f"{kind}: decoding {shape[0] if decoded is None else decoded:,} images once into {path} "
              "(shared by every process on this machine; lightning_meta.data.prune_cache removes the files no "
              "dataset uses)")
        build(path, key, shape, decode, decoded, finish, workers, desc=f"{kind}: decoding images once into {path.name}")

    built = build_once(path, make)
    return read_cache(path, key, shape), CacheFile(path, built, key, tuple(shape))


def decode_all(shape: tuple[int, ...], decode: Callable[[int], np.ndarray], decoded: Optional[int] = None,
               finish: Optional[Callable[[np.ndarray], None]] = None) -> np.ndarray:
    """The uncached path (``cache=False``): decode one image after another into process memory."""
    out = np.empty(shape, dtype=np.uint8)
    _decode_rows(out, decode, 0, shape[0] if decoded is None else decoded)
    if finish is not None:
        finish(out)
    return out


def prune_cache(keep: Any, cache_dir: Optional[Union[str, os.PathLike]] = None, dry_run: bool = False) -> list[Path]:
    """Remove the cache files in ``cache_dir`` (default: :func:`default_cache_dir`) that no dataset in ``keep`` uses
    and no running process has mapped, and the temporary files of killed builds; returns the paths removed (with
    ``dry_run=True``, the paths it would remove, removing nothing).

    Every change of a dataset's files or options builds a new file beside the old one: ``prune_cache([train, val,
    test])`` keeps the files of those datasets and removes the rest. ``keep`` holds datasets (anything with a
    ``cache_file``), :class:`CacheFile` s or paths (or is one of them). On Linux a file that any process has mapped (a
    run in progress, a dataset alive in this process) is kept as well (read from ``/proc/<pid>/maps``, for the
    processes this user may read); elsewhere only ``keep`` protects a file. Nothing but the cache's own files
    (``*.lmcache`` decoded images, ``*.lmindex`` indexes and packs of the encoded store, their temporary and lock
    files) is touched.

    Example:
        >>> import tempfile
        >>> prune_cache([], tempfile.mkdtemp())
        []
    """
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    single = hasattr(keep, "cache_file") or isinstance(keep, (str, os.PathLike, CacheFile))
    if not single and not hasattr(keep, "__iter__"):
        raise TypeError(f"Expected `keep` to hold datasets, cache files or paths, but got {type(keep).__name__}.")
    kept = set()
    items = []
    for item in [keep] if single else list(keep):
        if hasattr(item, "cache_file") and not isinstance(item, CacheFile):
            # a dataset: its decoded images, and the index its records are read through (MetaDatasetRecords)
            items += [f for f in (item.cache_file, getattr(item, "index_file", None)) if f is not None]
        else:  # a CacheFile or a path (a dataset decoded into memory or built from a tensor has none)
            items.append(item)
    for item in items:
        if isinstance(item, CacheFile):
            item = item.path
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"Expected `keep` to hold datasets, cache files or paths, but got {type(item).__name__}.")
        kept.add(os.path.realpath(item))
    if not folder.is_dir():
        return []
    in_use = kept | _mapped_cache_files()
    removed = [p for suffix in SUFFIXES for p in sorted(folder.glob(f"*{suffix}")) if os.path.realpath(p) not in in_use]
    # locks left by a killed build, or by an older version
    for lock in sorted(p for suffix in SUFFIXES for p in folder.glob(f"*{suffix}.lock")):
        with _lock_if_free(lock) as free:
            if free:
                removed.append(lock)
                if not dry_run:
                    lock.unlink(missing_ok=True)  # while locked, as _locked does
    for tmp in sorted(p for suffix in SUFFIXES for p in folder.glob(f"*{suffix}.*.tmp")):
        with _lock_if_free(folder / (tmp.name.rsplit(".", 2)[0] + ".lock")) as free:
            if free:  # no build holds the lock of its cache: a killed one wrote it
                removed.append(tmp)
    if not dry_run:
        for path in removed:
            if path.suffix != ".lock":  # removed above while held: this name may be a new build's lock by now
                path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def _lock_if_free(lock: Path):
    """Whether no process holds ``lock`` (absent counts as free), holding it meanwhile where it exists."""
    try:
        import fcntl

        fd = os.open(lock, os.O_RDONLY)
    except (ImportError, OSError):
        yield not lock.exists()
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _mapped_cache_files() -> set[str]:
    """The cache files any process on this machine has mapped (Linux; processes this user may not read are missed)."""
    found = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text().splitlines():
                if line.endswith(SUFFIXES):
                    found.add(line.split(None, 5)[-1])
    return found
