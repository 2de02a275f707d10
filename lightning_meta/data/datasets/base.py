"""Image datasets: decoded, resized images as one uint8 tensor (mapped from the decoded-image cache), so an episode is
one gather."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from lightning_meta.data.datasets.cache import (
    CacheArg,
    CacheFile,
    cache_dir_of,
    cache_key,
    cache_path,
    decode_all,
    file_fingerprint,
    open_or_build,
    read_cache,
    started,
)
from lightning_meta.data.datasets.encoded import (
    EncodedImages,
    PayloadDecoder,
    Store,
    check_store,
    choose_store,
    pack_files,
)


class CachedImageDataset(Dataset):
    """Images held as one ``uint8`` tensor ``[n, C, H, W]`` with integer ``labels`` and readable ``class_names``
    (``None`` for a source whose classes have no names, only numbers).

    The built-in image datasets map that tensor from a decoded-image cache file shared by every process on the machine
    (see :mod:`lightning_meta.data.datasets.cache`; ``cache_file`` says where); one built from a tensor keeps it.
    :meth:`gather` serves many items as ``uint8`` with one index operation (the learner converts them to floats in
    [0, 1] on its device, after the transfer); single items are ``(float image in [0, 1], label)``.

    Example:
        >>> ds = CachedImageDataset(torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["a", "b"])
        >>> ds[2][1], ds.gather(torch.tensor([0, 3])).dtype, ds.num_classes
        (1, torch.uint8, 2)
    """

    images: Union[Tensor, EncodedImages]
    labels: Tensor
    class_names: Optional[list[str]]
    cache_file: Optional[CacheFile] = None

    def __init__(self, images: Union[Tensor, EncodedImages], labels: Tensor, class_names: Optional[Sequence[str]],
                 cache_file: Optional[CacheFile] = None) -> None:
        self.images, self.labels = images, labels.long()
        self.class_names = list(class_names) if class_names is not None else None
        self.cache_file = cache_file

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

    def gather(self, indices: Tensor) -> Tensor:
        """The images at ``indices`` as ``uint8 [len(indices), C, H, W]`` (one index operation). In a DataLoader
        worker they are written straight into shared memory, as PyTorch's own collate does: the batch then reaches the
        main process without a copy, and the worker's heap does not grow by a batch's size at a time (measured: 2 GB
        per worker after 150 meta-batches of 16 tasks without it, flat with it)."""
        if isinstance(self.images, EncodedImages):  # decoded here, in the worker that builds the episode
            return self.images.gather(indices)
        out = torch.empty((len(indices), *self.images.shape[1:]), dtype=self.images.dtype)
        if get_worker_info() is not None:
            out.share_memory_()
        return torch.index_select(self.images, 0, indices, out=out)

    @property
    def store(self) -> str:
        """``"decoded"`` (one ``uint8`` tensor, mapped from the decoded-image cache or in memory) or ``"encoded"``
        (:class:`~lightning_meta.data.datasets.encoded.EncodedImages`: decoded when drawn)."""
        return "encoded" if isinstance(self.images, EncodedImages) else "decoded"

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names is not None else int(torch.unique(self.labels).numel())

    def __getstate__(self) -> dict:
        # a cached dataset pickles (DataLoader workers under spawn, ddp_spawn) as its file's name, not its images
        state = dict(self.__dict__)
        if self.cache_file is not None and isinstance(self.images, Tensor):
            state.pop("images", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "images" not in state and state.get("cache_file") is not None:
            cache_file = state["cache_file"]
            self.images = torch.from_numpy(read_cache(cache_file.path, cache_file.key, cache_file.shape))

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.images.shape[1:]))
        return f"{type(self).__name__}({self.num_classes} classes, {len(self)} images of {shape})"


DECODER = 2  # the version of decode_image's pixels, in the decoded cache's key: bump it when they change
REDUCING_GAP = 2  # a JPEG at least this many times the target size (after libjpeg's 1/2-1/8 scaling) is decoded scaled


def decode_image(source, name: str, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    """Decode one image (a path, a binary file object or an encoded item's bytes) to ``uint8 [H, W, C]``, resized to
    ``size`` ``(H, W)`` when given; a broken file is named.

    The format is told by the content, not the name (ImageNet has PNG files named ``.JPEG``). A JPEG read as RGB at its
    own size is decoded by torchvision where it is installed (libjpeg-turbo: the same pixels as PIL's, without PIL's
    round trip). Everything else is PIL's: resizing is its Lanczos filter, and a JPEG at least ``2 * REDUCING_GAP``
    times the target size is first decoded by libjpeg at 1/2, 1/4 or 1/8 scale, to no less than ``REDUCING_GAP`` times
    it (as ``PIL.Image.thumbnail`` does: the Lanczos step then still reduces by 2x or more, mean difference from a
    full-size decode about 0.3 grey levels; a 300-500 px JPEG to 84 px decodes 1.3x-1.6x faster)."""
    try:
        data = _rgb_jpeg(source, mode)
        if data is not None and (size is None or _jpeg_size(data) == tuple(size)):
            array = _turbo(data)
            if array is not None:
                return array
        img = Image.open(io.BytesIO(data)) if data is not None else _open_image(source)
        with img:
            target = None if size is None else (size[1], size[0])
            if target is not None and img.format == "JPEG" and img.size != target:
                img.draft(img.mode, (REDUCING_GAP * target[0], REDUCING_GAP * target[1]))
            if img.mode != mode:
                img = img.convert(mode)
            if target is not None and img.size != target:
                img = img.resize(target, Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError) as err:
        # PIL names the in-memory copy it was given (<_io.BytesIO object at 0x...>), not the file: say what it found
        reason = "its content is in no image format PIL reads" if isinstance(err, UnidentifiedImageError) else err
        raise ValueError(f"Cannot read the image file {name}: {reason}. Remove or replace the corrupt file.") from err
    return array[:, :, None] if array.ndim == 2 else array


JPEG_START = b"\xff\xd8\xff"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def _rgb_jpeg(source, mode: str) -> bytes | None:
    """The bytes of ``source`` (a path or an encoded item's bytes) when it is a JPEG to be read as RGB, else None."""
    if mode != "RGB":
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            if f.read(3) != JPEG_START:
                return None
            data = JPEG_START + f.read()
    else:
        return None
    return data if data[:3] == JPEG_START else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(H, W)`` from a JPEG's start-of-frame segment (a few segments in), None where the markers do not parse."""
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF:
            return int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
        if marker == 0xD9 or marker == 0xDA:  # end of image, or the scan before any frame header: not parsable
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _turbo(data: bytes) -> np.ndarray | None:
    """``uint8 [H, W, 3]`` of a JPEG by torchvision's libjpeg-turbo; None without torchvision or for a JPEG it refuses
    (PIL then reads it, or names what is wrong)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    try:
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    return np.ascontiguousarray(decoded.permute(1, 2, 0).numpy())


def _open_image(source) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


class ImageDecoder(Protocol):
    """What :func:`load_images` decodes from: item ``i`` as ``uint8 [H, W, C]`` (:class:`FileDecoder`, or an array or
    a dataset column), its readable name, and a fingerprint of the sources that keys the cache."""

    @property
    def sources(self) -> Sized: ...
    @property
    def size(self) -> tuple[int, int] | None: ...
    @property
    def mode(self) -> str: ...
    @property
    def invert(self) -> bool: ...
    def __call__(self, i: int) -> np.ndarray: ...
    def name(self, i: int) -> str: ...
    def fingerprint(self) -> Any: ...


def adjust(image: np.ndarray, invert: bool, reverse: bool) -> np.ndarray:
    """A decoded ``uint8 [H, W, C]`` image inverted (``255 - x``, Omniglot's strokes) and/or with its channels reversed
    (RGB -> BGR), as a decoder's ``invert`` and ``reverse`` say."""
    image = 255 - image if invert else image
    return image[:, :, ::-1] if reverse else image


class FileDecoder:
    """Decodes item ``i`` of a list of image files to ``uint8 [H, W, C]``: picklable, so a pool of processes can share
    the work. A source is a path, or ``(archive.zip, member)`` for an image inside a zip file."""

    def __init__(self, sources: Sequence[str | tuple[str, str]], size: tuple[int, int] | None, mode: str,
                 invert: bool = False, reverse: bool = False) -> None:
        self.sources, self.size, self.mode, self.invert, self.reverse = list(sources), size, mode, invert, reverse
        self._archives: dict[str, zipfile.ZipFile] = {}

    def name(self, i: int) -> str:
        source = self.sources[i]
        return source if isinstance(source, str) else f"{source[0]}:{source[1]}"

    def __call__(self, i: int) -> np.ndarray:
        source = self.sources[i]
        if not isinstance(source, str):
            archive = self._archives.get(source[0])
            if archive is None:
                archive = self._archives[source[0]] = zipfile.ZipFile(source[0])
            image = decode_image(archive.read(source[1]), self.name(i), self.size, self.mode)
        else:
            image = decode_image(source, self.name(i), self.size, self.mode)
        return adjust(image, self.invert, self.reverse)

    def fingerprint(self) -> list:
        """What the decoded images depend on, in order: each distinct file's path, size, times and inode
        (:func:`~lightning_meta.data.datasets.cache.file_fingerprint`, an archive's once), then the items as positions
        in that list (``[archive position, member]`` for a zip member), repeats included."""
        files = list(dict.fromkeys(s if isinstance(s, str) else s[0] for s in self.sources))  # first-seen order
        position = {f: i for i, f in enumerate(files)}
        return [file_fingerprint(files), [position[s] if isinstance(s, str) else [position[s[0]], s[1]]
                                          for s in self.sources]]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_archives"} | {"_archives": {}}


def load_images(kind: str, decoder: ImageDecoder, cache: CacheArg = True, workers: int | None = None,
                rows: int | None = None, finish: Callable[[np.ndarray], None] | None = None,
                options: dict | None = None, store: Store = "decoded", decoded_limit: int | None = None,
                max_open_files: int = 16) -> tuple[Union[Tensor, EncodedImages], CacheFile | None]:
    """The images ``uint8 [rows, C, H, W]`` of ``decoder``'s files (``rows`` defaults to one per file; ``finish``
    fills any rows after them).

    ``store="decoded"``: decoded once and mapped from the decoded-image cache in ``cache``'s folder (built there on
    first use), or decoded into memory with ``cache=False``. ``store="encoded"``: kept encoded and decoded when drawn
    (:class:`~lightning_meta.data.datasets.encoded.EncodedImages`; image files are copied once into a pack in the cache
    folder). ``store="auto"``: decoded when its size fits under ``decoded_limit`` (default: half the cache disk's free
    space and half the memory), else encoded; the choice is logged."""
    check_store(kind, store)
    n = len(decoder.sources)
    channels = len(Image.new(decoder.mode, (1, 1)).getbands())
    if decoder.size is None and store != "decoded":
        raise ValueError(f"{kind}: `store={store!r}` needs `image_size` (the encoded store decodes items when they are "
                         "drawn, so every item must resize to one known size): pass `image_size`, or "
                         "`store='decoded'`.")
    size = decoder.size or decoder(0).shape[:2]
    shape = (rows or n, channels, size[0], size[1])
    folder = cache_dir_of(cache)
    fingerprint = decoder.fingerprint() if folder is not None else None  # (stats every file: computed once)
    key = None if folder is None or store == "encoded" else cache_key(
        kind, {"size": decoder.size, "mode": decoder.mode, "invert": decoder.invert,
               "reverse": getattr(decoder, "reverse", False), "decoder": DECODER, **(options or {})}, fingerprint)
    # a decoded cache that is there (or being built by another rank) is used: the space it took is no reason not to
    there = folder is not None and key is not None and started(cache_path(folder, kind, key, shape))
    store = choose_store(kind, store, shape, cache, decoded_limit, there)  # type: ignore[assignment]
    if store == "encoded":
        if rows is not None and rows != n:
            raise ValueError(f"{kind} adds images of its own (e.g. rotated copies), which only the decoded store holds: "
                             "pass `store='decoded'`.")
        if not isinstance(decoder, PayloadDecoder):
            if not isinstance(decoder, FileDecoder):
                raise ValueError(f"{kind} reads its images from {type(decoder).__name__}, which the encoded store does "
                                 "not keep: pass `store='decoded'`.")
            items, cache_file = pack_files(kind, decoder.sources, fingerprint, decoder.name, cache, max_open_files)
            decoder = PayloadDecoder(items, decoder.size, decoder.mode, decoder.invert, decoder.reverse)
            return EncodedImages(decoder, shape), cache_file
        return EncodedImages(decoder, shape), None
    if folder is None or key is None:
        return torch.from_numpy(decode_all(shape, decoder, n, finish)), None
    images, cache_file = open_or_build(folder, kind, key, shape, decoder, n, finish, workers)
    return torch.from_numpy(images), cache_file


def _size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        if image_size < 1:
            raise ValueError(f"Expected `image_size` to be a positive integer, but got {image_size}.")
        return (image_size, image_size)
    return tuple(int(s) for s in image_size)  # type: ignore[return-value]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def is_image(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
