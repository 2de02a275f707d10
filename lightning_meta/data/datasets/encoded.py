"""The encoded store: images kept as their encoded bytes (JPEG, PNG...) and decoded when an episode draws them.

The decoded store (:mod:`~lightning_meta.data.datasets.cache`) decodes every image once into one memory-mapped
``uint8`` file: the fastest to sample, but its size is ``n x C x H x W`` bytes (QuickDraw's 50 million images at 84 px
RGB: 1 TB). The encoded store keeps what the files hold and decodes each drawn item in the DataLoader worker that
builds its episode, with the decoder and resize of the decoded store (:class:`PayloadDecoder`): both stores give the same
pixels for the same item.

Its items are byte ranges ``(file, offset, length)`` of a few data files, listed in an *index file*
(``<Kind>-<key>.lmindex`` in the cache folder, built once per machine under the cache's lock and memory-mapped by
every process: flat in memory however many items). Two sources:

- **TFRecord files** (Meta-Dataset): the records stay where they are; an item is a record's data (its CRC-32C checked
  and its ``tf.train.Example`` parsed when read, its label compared with its file's class);
- **image files** (:class:`~lightning_meta.data.ClassFolder` and the other folder datasets): their bytes are copied
  once into the index file itself (a *pack*), so that a folder of 14 million images is one file, one descriptor and one
  mapping, and no process holds a Python list of 14 million paths.

A process keeps at most ``max_open`` data files open (least recently used closed first), whatever the number of
classes, and reads with ``pread`` (no shared file position: safe after a fork).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from lightning_meta.data.datasets import tfrecord
from lightning_meta.data.datasets.cache import (
    HEADER,
    CacheArg,
    CacheFile,
    _info,
    _memory,
    build_once,
    cache_dir_of,
    cache_key,
    file_fingerprint,
)

Store = Literal["auto", "decoded", "encoded"]
STORES = ("auto", "decoded", "encoded")
INDEX_MAGIC = b"lightning-meta encoded index\n"
INDEX_FORMAT = 1
ENTRY = np.dtype([("file", "<i4"), ("offset", "<i8"), ("length", "<i8")])


def check_store(kind: str, store: str) -> None:
    if store not in STORES:
        raise ValueError(f"{kind}: expected `store` to be one of {', '.join(map(repr, STORES))}, but got {store!r}.")


def _index_error(path: Path, what: str) -> ValueError:
    return ValueError(f"The encoded-image index {path} {what}. Delete it (a new one is built on the next construction), "
                      "or pass another `cache` folder.")


def _write_index(path: Path, key: str, entries: np.ndarray, files: Optional[Sequence[str]],
                 payload: Callable[[Any], None] | None = None, names: Optional[Sequence[str]] = None) -> None:
    """Write an index file atomically: header, ``entries``, then (a pack) ``payload(file)`` writes the image bytes that
    ``entries`` point to (offsets from the start of the file) and ``names`` (one per item, for error messages)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER)
            entries_at = f.tell()
            f.write(entries.tobytes())
            names_at = names_len = 0
            if names is not None:
                blob = "\n".join(names).encode("utf-8", "surrogateescape")
                names_at, names_len = f.tell(), len(blob)
                f.write(blob)
            data_at = f.tell()
            if payload is not None:
                payload(f)
            meta = {"format": INDEX_FORMAT, "key": key, "n": len(entries), "entries": entries_at, "data": data_at,
                    "files": None if files is None else list(files), "names": [names_at, names_len]}
            head = INDEX_MAGIC + json.dumps(meta).encode() + b"\n"
            if len(head) > HEADER:  # many files: their list goes after the data
                at = f.seek(0, os.SEEK_END)
                f.write(json.dumps(meta["files"]).encode())
                meta["files"] = [at, f.tell() - at]
                head = INDEX_MAGIC + json.dumps(meta).encode() + b"\n"
            f.seek(0)
            f.write(head)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path, key: str) -> tuple[np.ndarray, Optional[list[str]], tuple[int, int]]:
    """Map an index file: its entries ``[n]`` (``file``, ``offset``, ``length``), its data files (``None``: a pack,
    whose data is in the index file itself) and where its item names are."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
            if not head.startswith(INDEX_MAGIC):
                raise _index_error(path, "is not a lightning-meta encoded-image index")
            meta = json.loads(head[len(INDEX_MAGIC):].split(b"\n", 1)[0])
            if meta.get("format") != INDEX_FORMAT or meta.get("key") != key:
                raise _index_error(path, f"was written for other images (key {meta.get('key')}, expected {key})")
            files = meta["files"]
            if isinstance(files, list) and len(files) == 2 and all(isinstance(v, int) for v in files):
                f.seek(files[0])
                files = json.loads(f.read(files[1]))
            n, at = int(meta["n"]), int(meta["entries"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        if isinstance(err, ValueError) and str(err).startswith("The encoded-image index"):
            raise
        raise _index_error(path, f"cannot be read ({err})") from err
    if path.stat().st_size < at + n * ENTRY.itemsize:
        raise _index_error(path, "is truncated")
    entries = np.memmap(path, dtype=ENTRY, mode="r", offset=at, shape=(n,)) if n else np.empty(0, ENTRY)
    names_at, names_len = meta["names"]
    return entries, files, (int(names_at), int(names_len))


def open_or_build_index(folder: Path, kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The index file of ``key`` in ``folder``, built by ``build(path)`` by one process while the others wait."""
    path = folder / f"{kind}-{key}.lmindex"
    return path, build_once(path, lambda: build(path))


class EncodedItems:
    """Encoded items read from their files: ``data(i)`` is item ``i``'s image bytes, ``name(i)`` names it.

    ``payload="tfrecord"``: each entry is a record's data (CRC-checked when read, parsed as a ``tf.train.Example``
    whose ``image`` feature is the image and whose ``label`` must equal ``labels[file]``); ``"raw"``: the bytes are the
    image. Picklable (a DataLoader worker maps the index again and opens its own files)."""

    def __init__(self, index: Path, key: str, payload: Literal["tfrecord", "raw"], labels: Optional[Sequence[int]] = None,
                 max_open: int = 16) -> None:
        if max_open < 1:
            raise ValueError(f"Expected `max_open_files` to be at least 1, but got {max_open}.")
        self.index, self.key, self.payload, self.max_open = Path(index), key, payload, max_open
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._open()

    def _open(self) -> None:
        self.entries, files, self._names = read_index(self.index, self.key)
        self.files = [str(self.index)] if files is None else files
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def fingerprint(self) -> str:
        return self.key

    def _fd(self, file: int) -> int:
        if self._pid != os.getpid():  # a forked child: close its copies of the parent's descriptors, open its own
            for inherited in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(inherited)
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(file)
        if fd is not None:
            self._fds.move_to_end(file)
            return fd
        while len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = self._fds[file] = os.open(self.files[file], os.O_RDONLY)
        except OSError as err:
            raise ValueError(f"Cannot read {self.files[file]} ({err}): restore it, or delete the index "
                             f"{self.index} if the data moved.") from err
        return fd

    def open_files(self) -> int:
        """How many data files this process holds open now (at most ``max_open``)."""
        return len(self._fds) if self._pid == os.getpid() else 0

    def data(self, i: int) -> bytes:
        file, offset, length = (int(v) for v in self.entries[i])
        path = self.files[file]
        if self.payload == "raw":
            data = os.pread(self._fd(file), length, offset)
            if len(data) != length:
                raise ValueError(f"{self.index} is truncated: item {i} lies past its end. Delete it (it is rebuilt).")
            return data
        framed = os.pread(self._fd(file), length + 4, offset)
        if len(framed) != length + 4:
            raise tfrecord._damaged(path, offset - 12, "the file ends inside the record (truncated since it was indexed)")
        record = tfrecord.check_record(path, offset, framed)
        try:
            features = tfrecord.parse_example(record)
        except ValueError as err:
            raise tfrecord._damaged(path, offset - 12, f"its data is not a tf.train.Example ({err})") from err
        image, label = features.get("image"), features.get("label")
        if not image or not isinstance(image[0], bytes):
            raise tfrecord._damaged(path, offset - 12, f"its Example has no `image` bytes (it has {sorted(features)})")
        if self.labels is not None:
            if not label or label[0] != self.labels[file]:
                raise ValueError(f"The record whose frame starts at byte {offset - 12} of {path} has label "
                                 f"{label[0] if label else None!r}, but the file holds class {self.labels[file]}: the file "
                                 "mixes classes or was renamed. Convert the source again, or put the file back under "
                                 "its class's name.")
        return image[0]

    def name(self, i: int) -> str:
        file, offset, _ = (int(v) for v in self.entries[i])
        if self.payload == "tfrecord":
            return f"{self.files[file]} (record at byte {offset - 12})"
        names = self.names()
        return names[i] if names else f"item {i} of {self.index}"

    def names(self) -> list[str]:
        """A pack's item names (its image files, as the dataset named them), read from the index when asked; ``[]``
        for records (named by file and offset) or a pack written without names."""
        at, size = self._names
        if not size:
            return []
        with open(self.index, "rb") as f:
            f.seek(at)
            return f.read(size).decode("utf-8", "surrogateescape").split("\n")

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("index", "key", "payload", "max_open", "labels")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()


class PayloadDecoder:
    """Decodes encoded items to ``uint8 [H, W, C]`` with the decoded store's decoder and resize
    (:func:`~lightning_meta.data.datasets.base.decode_image`): an ``ImageDecoder`` for :func:`load_images`, so
    both stores go through this one function."""

    def __init__(self, items: EncodedItems, size: Optional[tuple[int, int]], mode: str, invert: bool = False,
                 reverse: bool = False) -> None:
        self.items, self.size, self.mode, self.invert, self.reverse = items, size, mode, invert, reverse

    @property
    def sources(self) -> EncodedItems:
        return self.items

    def __call__(self, i: int) -> np.ndarray:
        from lightning_meta.data.datasets.base import adjust, decode_image

        return adjust(decode_image(self.items.data(i), self.items.name(i), self.size, self.mode), self.invert,
                      self.reverse)

    def name(self, i: int) -> str:
        return self.items.name(i)

    def fingerprint(self) -> str:
        return self.items.fingerprint()


class EncodedImages:
    """The encoded store seen as images ``uint8 [n, C, H, W]``: ``gather(indices)`` decodes the items it is given
    (in a DataLoader worker straight into shared memory, as the decoded store does); ``images[i]`` one item."""

    dtype = torch.uint8

    def __init__(self, decoder: PayloadDecoder, shape: tuple[int, int, int, int]) -> None:
        self.decoder, self.shape = decoder, torch.Size(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _decode(self, i: int, out: Tensor) -> None:
        image = self.decoder(i)
        if image.shape != (self.shape[2], self.shape[3], self.shape[1]):
            raise ValueError(f"{self.decoder.name(i)} decodes to {image.shape[1]}x{image.shape[0]} with "
                             f"{image.shape[2]} channel(s), but the dataset's images are {self.shape[3]}x{self.shape[2]} "
                             f"with {self.shape[1]}: pass `image_size` to resize them all to one size.")
        out.numpy()[...] = image.transpose(2, 0, 1)

    def gather(self, indices: Tensor) -> Tensor:
        out = torch.empty((len(indices), *self.shape[1:]), dtype=torch.uint8)
        if get_worker_info() is not None:
            out.share_memory_()
        for row, i in enumerate(indices.tolist()):
            self._decode(i, out[row])
        return out

    def __getitem__(self, index: int) -> Tensor:
        if not isinstance(index, (int, np.integer)):
            raise TypeError("The encoded store serves one item by its integer index (or many with `gather`).")
        n, i = self.shape[0], int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} images")
        out = torch.empty(tuple(self.shape[1:]), dtype=torch.uint8)
        self._decode(i % n, out)
        return out

    @property
    def open_files(self) -> int:
        return self.decoder.items.open_files()


# ------------------------------------------------------------------------------------------------ building


def index_records(kind: str, files: Sequence[str], counts: Sequence[int], labels: Sequence[int], cache: CacheArg,
                  max_open: int = 16) -> tuple[EncodedItems, Optional[CacheFile]]:
    """Index the records of TFRecord files (each file one class, ``labels[f]`` its class id, ``counts[f]`` how many
    records the spec says it holds): the frames are read and their length CRCs checked; a missing file, a truncated
    one or a count that disagrees with the spec is an error naming the file."""
    for f, name in enumerate(files):
        if not os.path.isfile(name):
            raise ValueError(f"{kind}: the class file {name} is missing (the spec lists class "
                             f"{labels[f]}): copy the source's records whole, or point `root` at "
                             "the folder that holds them.")
    key = cache_key(kind + "-index", {"format": INDEX_FORMAT, "labels": list(map(int, labels)),
                                      "counts": list(map(int, counts))}, file_fingerprint(list(files)))

    def build(path: Path) -> None:
        parts = []
        for f, (name, expected) in enumerate(zip(files, counts)):
            offsets, lengths = tfrecord.scan_tfrecord(name)
            if len(offsets) != expected:
                raise ValueError(f"{kind}: {name} holds {len(offsets)} records, but the source's dataset_spec.json says "
                                 f"class {labels[f]} has {expected}: the file is incomplete or the spec belongs to other "
                                 "records. Copy or convert the class again, or use the spec written with these records.")
            part = np.empty(len(offsets), ENTRY)
            part["file"], part["offset"], part["length"] = f, offsets, lengths
            parts.append(part)
        entries = np.concatenate(parts) if parts else np.empty(0, ENTRY)
        _write_index(path, key, entries, list(files))

    folder = cache_dir_of(cache)
    if folder is None:  # no cache folder: the index lives in this process's private temporary folder
        folder = _private_folder()
    path, built = open_or_build_index(Path(folder), kind, key, build)
    return EncodedItems(path, key, "tfrecord", labels, max_open), CacheFile(path, built, key)


_PRIVATE: dict[int, Path] = {}


def _private_folder() -> Path:
    """One temporary folder per process for indexes built with ``cache=False``, removed when the process that made
    it exits (not by forked workers, which still read the indexes it holds)."""
    pid = os.getpid()
    if pid not in _PRIVATE:
        import atexit
        import tempfile

        folder = _PRIVATE[pid] = Path(tempfile.mkdtemp(prefix="lightning-meta-index-"))

        def remove() -> None:
            if os.getpid() == pid:
                shutil.rmtree(folder, ignore_errors=True)

        atexit.register(remove)
    return _PRIVATE[pid]


def pack_files(kind: str, sources: Sequence[Union[str, tuple[str, str]]], fingerprint: Any, name: Callable[[int], str],
               cache: CacheArg, max_open: int = 16) -> tuple[EncodedItems, CacheFile]:
    """Copy the bytes of image files (paths, or ``(archive.zip, member)``) once into a pack in the cache folder:
    one file holding the images' bytes and their index."""
    import zipfile

    folder = cache_dir_of(cache)
    if folder is None:
        raise ValueError(f"{kind}: `store='encoded'` copies the images' bytes once into the cache folder, so it needs "
                         "`cache=True` or a folder; with `cache=False` use `store='decoded'`.")
    key = cache_key(kind + "-pack", {"format": INDEX_FORMAT}, fingerprint)

    def build(path: Path) -> None:
        sizes = np.empty(len(sources), dtype=np.int64)
        archives: dict[str, zipfile.ZipFile] = {}
        for i, s in enumerate(sources):
            if isinstance(s, str):
                sizes[i] = os.path.getsize(s)
            else:
                archive = archives.get(s[0]) or archives.setdefault(s[0], zipfile.ZipFile(s[0]))
                sizes[i] = archive.getinfo(s[1]).file_size
        names = [name(i) for i in range(len(sources))]
        entries = np.empty(len(sources), ENTRY)
        entries["file"], entries["length"] = 0, sizes
        blob = "\n".join(names).encode("utf-8", "surrogateescape")
        data_at = HEADER + entries.nbytes + len(blob)
        entries["offset"] = data_at + np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else 0
        _info(f"{kind}: copying the bytes of {len(sources):,} image files once into {path} (the encoded store: "
              "images are decoded when an episode draws them)")

        def payload(f) -> None:
            for s in sources:
                if isinstance(s, str):
                    with open(s, "rb") as src:
                        shutil.copyfileobj(src, f)
                else:
                    f.write(archives[s[0]].read(s[1]))

        _write_index(path, key, entries, None, payload, names)

    path, built = open_or_build_index(folder, kind, key, build)
    return EncodedItems(path, key, "raw", None, max_open), CacheFile(path, built, key)


def decoded_limit_of(cache: CacheArg, limit: Optional[int]) -> tuple[int, str]:
    """The largest decoded store ``store="auto"`` builds (bytes) and why: ``limit`` where given, else half the free
    space of the cache folder's disk and half the machine's memory, whichever is smaller."""
    if limit is not None:
        return int(limit), f"`decoded_limit`={int(limit):,} bytes"
    memory = _memory() // 2
    folder = cache_dir_of(cache)
    if folder is None:
        return memory, f"half this machine's memory ({_gb(memory)})"
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free // 2 if probe.exists() else memory
    return min(memory, free), f"the smaller of half the free space on {folder}'s disk ({_gb(free)}) and half this " \
                              f"machine's memory ({_gb(memory)})"


def _gb(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def choose_store(kind: str, store: str, shape: Sequence[int], cache: CacheArg, limit: Optional[int],
                 decoded_there: bool = False) -> str:
    """``store`` itself unless ``"auto"``: then ``"decoded"`` when its cache file is already there or being built
    (``decoded_there``: every rank and every later run takes the store the first one chose, whatever the free space
    now left), or when ``n x C x H x W`` bytes fit under the limit (:func:`decoded_limit_of`), else ``"encoded"``; the
    choice and its reason are logged."""
    check_store(kind, store)
    if store != "auto":
        return store
    if decoded_there:
        _info(f"{kind}: store='auto' chose the decoded store: its cache file is already in {cache_dir_of(cache)} (or "
              "being built there); the limit bounds what `auto` builds, not what it uses. Pass `store=` to choose.")
        return "decoded"
    size = int(np.prod([int(s) for s in shape]))
    most, why = decoded_limit_of(cache, limit)
    chosen = "decoded" if size <= most else "encoded"
    _info(f"{kind}: store='auto' chose the {chosen} store: decoded, its {int(shape[0]):,} images of "
          f"{'x'.join(map(str, shape[1:]))} take {_gb(size)}, {'within' if size <= most else 'over'} the limit of "
          f"{_gb(most)} ({why}). Pass `store=` to choose, or `decoded_limit=` to move the limit.")
    return chosen


__all__ = ["EncodedImages", "EncodedItems", "PayloadDecoder", "Store", "check_store", "choose_store",
           "decoded_limit_of", "index_records", "pack_files"]
