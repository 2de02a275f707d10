"""The decoded-image cache: one memory-mapped ``uint8`` file per dataset and size, shared by every process on a machine.

A dataset lists its images (file names, sizes, modification times: no decoding), derives a key from that list and its
decoding options, and maps ``<cache_dir>/<Kind>-<H>x<W>-<key>.lmcache``. The first process to get there decodes the
images, in parallel over the cores, into a temporary file, checks it and renames it into place, holding a lock file
so that processes starting at the same time wait for it instead of decoding again; every later process (each DDP
rank, each DataLoader worker, each run) maps the finished file read-only. The operating system's page cache then
holds one copy of the images for all of them, and a process's private memory does not grow with the dataset.

File layout: a 4096-byte header (a magic line, then JSON: format, key, shape) followed by the images ``[n, C, H, W]``
in C order. A changed source or option gives another key, hence another file; a file that is truncated, foreign or
holds another key is named in an error that says how to fix it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import multiprocessing
import os
import sys
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


def file_fingerprint(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of every file: what the key of a cache built from them depends on."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((p, st.st_size, st.st_mtime_ns))
    return out


def cache_key(kind: str, options: dict[str, Any], sources: Any) -> str:
    """A digest of everything the decoded images depend on: the dataset kind, its decoding options and its sources
    (e.g. :func:`file_fingerprint`)."""
    text = json.dumps({"format": FORMAT, "kind": kind, "options": options, "sources": sources}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class CacheFile:
    """Where a dataset's images are mapped from, and whether this process built the file (``built``)."""

    path: Path
    built: bool

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


def read_cache(path: Path, key: Optional[str] = None) -> np.ndarray:
    """Map a finished cache file read-only (copy-on-write, so it is shared, never written): ``uint8 [n, C, H, W]``.
    Raises a ``ValueError`` naming the file and the fix when it is not a whole cache of ``key``."""
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
        shape = tuple(int(s) for s in meta["shape"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"The image cache {path} has a damaged header ({err}). {_fix(path)}") from err
    if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
        raise ValueError(f"The image cache {path} was written for other images (format {meta.get('format')}, key "
                         f"{meta.get('key')}; expected {FORMAT}, {key}). {_fix(path)}")
    expected = HEADER + int(np.prod(shape))
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"The image cache {path} is truncated or damaged: {size} bytes where {shape} images need "
                         f"{expected}. {_fix(path)}")
    return _map(path, shape)


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


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock held by one process at a time (released by the kernel if the process dies)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): concurrent first builds may both decode, the rename stays atomic
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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


def _set_decoder(decode: Callable[[int], np.ndarray]) -> None:
    global _DECODER
    _DECODER = decode


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
        with open(tmp, "wb") as f:
            f.write(_header(key, shape))
            f.truncate(HEADER + int(np.prod(shape)))
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
                with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_decoder,
                                         initargs=(decode,)) as pool:
                    jobs = [pool.submit(_fill, str(tmp), shape, s, min(n, s + chunk)) for s in range(0, n, chunk)]
                    for job in jobs:
                        done = job.result()
                        if bar is not None:
                            bar.update(done)
        if finish is not None:
            images = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER, shape=shape)
            finish(images)
            images.flush()
            del images
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        read_cache(tmp, key)  # whole and readable, or raise before the rename
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_or_build(cache_dir: Path, kind: str, key: str, shape: tuple[int, ...], decode: Callable[[int], np.ndarray],
                  decoded: Optional[int] = None, finish: Optional[Callable[[np.ndarray], None]] = None,
                  workers: Optional[int] = None) -> tuple[np.ndarray, CacheFile]:
    """Map the cache of ``key`` in ``cache_dir``, building it first when no process has (one process builds while the
    others wait on a lock file; temporary files of a build that was killed are removed)."""
    path = Path(cache_dir) / f"{kind}-{shape[2]}x{shape[3]}-{key}.lmcache"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"Cannot create the image cache folder {path.parent} ({err}): pass `cache=` a writable folder "
                         f"(or set ${ENV}), or `cache=False` to decode into this process's memory.") from err
    built = False
    if not path.exists():
        with _locked(path.with_name(path.name + ".lock")):
            if not path.exists():
                for stale in path.parent.glob(f"{path.name}.*.tmp"):  # a killed build (we hold the lock)
                    stale.unlink(missing_ok=True)
                build(path, key, shape, decode, decoded, finish, workers, desc=f"{kind}: decoding images once into {path.name}")
                built = True
    return read_cache(path, key), CacheFile(path, built)


def decode_all(shape: tuple[int, ...], decode: Callable[[int], np.ndarray], decoded: Optional[int] = None,
               finish: Optional[Callable[[np.ndarray], None]] = None) -> np.ndarray:
    """The uncached path (``cache=False``): decode one image after another into process memory."""
    out = np.empty(shape, dtype=np.uint8)
    _decode_rows(out, decode, 0, shape[0] if decoded is None else decoded)
    if finish is not None:
        finish(out)
    return out
