"""The standard few-shot benchmarks in their published file layouts, with their class splits shipped here (nothing is
downloaded to define a split). Where to get each dataset is in the README ("Datasets").

- :class:`TieredImageNet` (Ren et al. 2018): 608 ImageNet classes, 351/97/160 by 34 super-categories; read from the
  common per-split image folders or the ``{split}_images.npz`` + ``{split}_labels.pkl`` files of MetaOptNet/RFS.
- :class:`CUB` (Wah et al. 2011): 200 bird species, split 100/50/50 as in Chen et al. 2019 ("A Closer Look").
- :class:`CIFARFS` (Bertinetto et al. 2019) and :class:`FC100` (Oreshkin et al. 2018): CIFAR-100's 100 classes of
  600 images (its train and test files together), split 64/16/20 by class and 60/20/20 by super-class respectively.

All of them keep their decoded images in the decoded-image cache (``cache``, ``decode_workers`` as for
:class:`~lightning_meta.data.ClassFolder`).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from lightning_meta._checks import check_choice
from lightning_meta.data.datasets.base import CachedImageDataset, _size, load_images
from lightning_meta.data.datasets.cache import CacheArg, file_fingerprint
from lightning_meta.data.datasets.folder import ClassFolder

SPLITS = ("train", "val", "test")

# CIFAR-FS: Bertinetto et al. 2019, the class lists of their released split files
CIFARFS_SPLITS = {
    "train": ["train", "skyscraper", "turtle", "raccoon", "spider", "orange", "castle", "keyboard", "clock", "pear",
              "girl", "seal", "elephant", "apple", "aquarium_fish", "bus", "mushroom", "possum", "squirrel", "chair",
              "tank", "plate", "wolf", "road", "mouse", "boy", "shrew", "couch", "sunflower", "tiger", "caterpillar",
              "lion", "streetcar", "lawn_mower", "tulip", "forest", "dolphin", "cockroach", "bear", "porcupine", "bee",
              "hamster", "lobster", "bowl", "can", "bottle", "trout", "snake", "bridge", "pine_tree", "skunk", "lizard",
              "cup", "kangaroo", "oak_tree", "dinosaur", "rabbit", "orchid", "willow_tree", "ray", "palm_tree",
              "mountain", "house", "cloud"],
    "val": ["otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver", "beetle",
            "tractor", "flatfish", "maple_tree", "camel", "crab", "sea", "cattle"],
    "test": ["baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
             "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm"],
}
# FC100: Oreshkin et al. 2018 (TADAM), CIFAR-100 super-class indices (``coarse_labels``) of each split
FC100_SUPERCLASSES = {"train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19), "val": (8, 11, 13, 16), "test": (0, 7, 12, 14)}


def cub_split(class_number: int) -> str:
    """The split of CUB class ``class_number`` (1..200, the folder prefix ``001.``) in Chen et al. 2019: of the classes
    in order, every even index trains, ``index % 4 == 1`` validates and ``index % 4 == 3`` tests (100/50/50)."""
    index = class_number - 1
    return "train" if index % 2 == 0 else "val" if index % 4 == 1 else "test"


class CUB(ClassFolder):
    """CUB-200-2011 birds: ``root`` is the extracted ``CUB_200_2011`` folder (``images/001.Black_footed_Albatross/
    ...jpg``); ``split`` keeps Chen et al. (2019)'s 100/50/50 classes (:func:`cub_split` of the folder number). Whole
    images, resized to ``image_size`` (84 by default).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for c in ("001.Albatross", "002.Auklet", "004.Tern"):
        ...     (root / "images" / c).mkdir(parents=True)
        ...     Image.new("RGB", (50, 40)).save(root / "images" / c / "a.jpg")
        >>> CUB(root, "val", image_size=8, cache=False).class_names
        ['002.Auklet']
    """

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 84, cache: CacheArg = True,
                 decode_workers: Optional[int] = None) -> None:
        check_choice("split", split, SPLITS)
        images = Path(root) / "images"
        if not images.is_dir():
            raise ValueError(f"CUB expects the extracted CUB_200_2011 folder as `root`, with an `images/` folder of "
                             f"class folders; {images} is not a folder.")
        classes = []
        for folder in sorted(p.name for p in images.iterdir() if p.is_dir()):
            number = folder.split(".", 1)[0]
            if not number.isdigit():
                raise ValueError(f"CUB class folder {images / folder} does not start with its class number (e.g. "
                                 "`001.Black_footed_Albatross`).")
            if cub_split(int(number)) == split:
                classes.append(folder)
        if not classes:
            raise ValueError(f"No CUB class folder of the {split} split is in {images}.")
        super().__init__(images, image_size, "RGB", cache, decode_workers, classes=classes)


class TieredImageNet(CachedImageDataset):
    """tieredImageNet (Ren et al. 2018). ``root`` holds either one image folder per split (``train/<wnid>/*.jpg``,
    ``val/``, ``test/``: the split is the folder) or MetaOptNet/RFS's files ``{split}_images.npz`` (decoded 84x84
    images, key ``images``) with ``{split}_labels.pkl`` (``labels``, or ``label_specific``; class names from
    ``label_specific_str`` where present).

    Example:
        >>> import tempfile, pickle
        >>> root = Path(tempfile.mkdtemp())
        >>> np.savez(root / "test_images.npz", images=np.zeros((4, 84, 84, 3), np.uint8))
        >>> _ = (root / "test_labels.pkl").write_bytes(pickle.dumps({"labels": [0, 0, 1, 1]}))
        >>> ds = TieredImageNet(root, "test", cache=False)
        >>> tuple(ds.images.shape), ds.class_names
        ((4, 3, 84, 84), ['test/0', 'test/1'])
    """

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 84, cache: CacheArg = True,
                 decode_workers: Optional[int] = None) -> None:
        check_choice("split", split, SPLITS)
        root = Path(root)
        if (root / split).is_dir():
            folder = ClassFolder(root / split, image_size, "RGB", cache, decode_workers)
            super().__init__(folder.images, folder.labels, folder.class_names, folder.cache_file)
            self.files = folder.files
            return
        images, labels = root / f"{split}_images.npz", root / f"{split}_labels.pkl"
        if not (images.is_file() and labels.is_file()):
            raise ValueError(f"tieredImageNet {split} split not found in {root}: expected the folder {root / split} of "
                             f"class folders, or the files {images.name} and {labels.name}.")
        table = _unpickle(labels)
        key = next((k for k in ("labels", "label_specific") if k in table), None)
        if key is None:
            raise ValueError(f"{labels} holds no `labels` or `label_specific` entry (it has {sorted(table)}).")
        raw = np.asarray(table[key]).astype(np.int64)
        values, label_ids = np.unique(raw, return_inverse=True)
        names_by_value = table.get("label_specific_str")
        names = [str(names_by_value[v]) if names_by_value is not None else f"{split}/{v}" for v in values]
        reader = _NpzImages(images)
        if reader.count != len(raw):
            raise ValueError(f"{images} holds {reader.count} images but {labels} has {len(raw)} labels.")
        data, cache_file = load_images(type(self).__name__, _ArrayDecoder(reader, _size(image_size)), cache,
                                       workers=1, options={"split": split})
        super().__init__(data, torch.from_numpy(label_ids), names, cache_file)


class CIFARFS(CachedImageDataset):
    """CIFAR-FS (Bertinetto et al. 2019) from CIFAR-100's python pickles: ``root`` is the ``cifar-100-python`` folder
    (``train``, ``test``, ``meta``). The classes of ``split`` (:data:`CIFARFS_SPLITS`), all 600 images each, 32x32
    unless ``image_size`` is given."""

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: Optional[int] = None,
                 cache: CacheArg = True, decode_workers: Optional[int] = None) -> None:
        check_choice("split", split, SPLITS)
        cifar = _Cifar100(Path(root))
        missing = sorted(set(CIFARFS_SPLITS[split]) - set(cifar.fine_names))
        if missing:
            raise ValueError(f"{root}/meta lacks the CIFAR-100 classes {missing[:3]}: is it CIFAR-100's python version?")
        wanted = [cifar.fine_names.index(n) for n in CIFARFS_SPLITS[split]]
        _select(self, cifar, cifar.fine, wanted, image_size, cache, split)


class FC100(CachedImageDataset):
    """FC100 (Oreshkin et al. 2018) from CIFAR-100's python pickles (``root`` as for :class:`CIFARFS`): the 5 classes of
    each super-class in :data:`FC100_SUPERCLASSES` of ``split``, all 600 images each, 32x32 unless ``image_size`` is
    given."""

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: Optional[int] = None,
                 cache: CacheArg = True, decode_workers: Optional[int] = None) -> None:
        check_choice("split", split, SPLITS)
        cifar = _Cifar100(Path(root))
        wanted = sorted({int(f) for f, c in zip(cifar.fine, cifar.coarse) if c in FC100_SUPERCLASSES[split]})
        _select(self, cifar, cifar.fine, wanted, image_size, cache, split)


# ------------------------------------------------------------------------------------------------------- helpers
def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"Cannot read {path} as a pickle ({err}): is the download whole?") from err


class _Cifar100:
    """CIFAR-100's python pickles: labels of its 60,000 images (train file, then test file) read at construction, the
    images on demand (:meth:`images`)."""

    def __init__(self, root: Path) -> None:
        self.files = [root / "train", root / "test"]
        meta = root / "meta"
        if not all(f.is_file() for f in [*self.files, meta]):
            raise ValueError(f"Expected CIFAR-100's python version in {root} (the files train, test and meta of "
                             "cifar-100-python.tar.gz).")
        self.fine_names = list(_unpickle(meta)["fine_label_names"])
        parts = [_unpickle(f) for f in self.files]
        self.fine = np.concatenate([np.asarray(p["fine_labels"]) for p in parts])
        self.coarse = np.concatenate([np.asarray(p["coarse_labels"]) for p in parts])

    def images(self) -> Iterator[np.ndarray]:
        for f in self.files:
            data = np.asarray(_unpickle(f)["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            yield from data


def _select(dataset: CachedImageDataset, cifar: _Cifar100, labels: np.ndarray, wanted: list[int],
            image_size: Optional[int], cache: CacheArg, split: str) -> None:
    """Fill ``dataset`` with the CIFAR-100 images whose label is in ``wanted`` (class ``i`` = ``wanted[i]``)."""
    keep = np.flatnonzero(np.isin(labels, wanted))
    renumber = {c: i for i, c in enumerate(wanted)}
    reader = _Subset(cifar.images, keep, fingerprint=file_fingerprint([str(f) for f in cifar.files]))
    images, cache_file = load_images(type(dataset).__name__, _ArrayDecoder(reader, _size(image_size)), cache,
                                     workers=1, options={"split": split})
    names = [cifar.fine_names[c] for c in wanted]
    CachedImageDataset.__init__(dataset, images, torch.tensor([renumber[int(c)] for c in labels[keep]]), names,
                                cache_file)


def _npy_header(f) -> tuple:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` stream, leaving it at the first byte of the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


class _NpzImages:
    """The ``images`` array of an ``.npz`` file, read image by image from the archive (never all at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
                shape, _, dtype = _npy_header(f)
        except (KeyError, zipfile.BadZipFile, ValueError, OSError) as err:
            raise ValueError(f"{path} is not an .npz file with an `images` array ({err}).") from err
        if dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"Expected {path}'s `images` to be uint8 [N, H, W, C], but got {dtype} {shape}.")
        self.count, self.shape = shape[0], shape[1:]
        self.fingerprint = file_fingerprint([str(path)])

    def __iter__(self) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape))
        with zipfile.ZipFile(self.path) as zf, zf.open("images.npy") as f:
            _npy_header(f)
            for _ in range(self.count):
                yield np.frombuffer(f.read(row), dtype=np.uint8).reshape(self.shape)


class _Subset:
    """The images at ``keep`` (sorted positions) of what ``images()`` iterates over."""

    def __init__(self, images: Callable[[], Iterator[np.ndarray]], keep: np.ndarray, fingerprint: Any) -> None:
        self.images, self.keep, self.count, self.fingerprint = images, keep, len(keep), [fingerprint, keep.tolist()]

    def __iter__(self) -> Iterator[np.ndarray]:
        wanted = iter(self.keep.tolist())
        target = next(wanted, None)
        for position, image in enumerate(self.images()):
            if position == target:
                yield image
                target = next(wanted, None)
                if target is None:
                    return


class _ArrayDecoder:
    """Serves decoded arrays (or encoded PNG bytes) of a reader in order, resized where ``size`` asks: the decoder of
    array-backed datasets, read in one process from first to last."""

    def __init__(self, reader: Any, size: Optional[tuple[int, int]]) -> None:
        self.reader, self.size, self.mode, self.invert = reader, size, "RGB", False
        self.sources = range(reader.count)
        self._iter: Optional[Iterator[np.ndarray]] = None
        self._next = 0

    def name(self, i: int) -> str:
        return f"image {i} of {getattr(self.reader, 'path', 'the dataset')}"

    def __call__(self, i: int) -> np.ndarray:
        if self._iter is None or i < self._next:  # (re)start: images are read in order
            self._iter, self._next = iter(self.reader), 0
        while self._next < i:
            next(self._iter)
            self._next += 1
        image = np.asarray(next(self._iter))
        self._next += 1
        if isinstance(image, np.ndarray) and image.ndim == 1:  # encoded bytes
            image = np.asarray(Image.open(io.BytesIO(image.tobytes())).convert("RGB"))
        if self.size is not None and image.shape[:2] != self.size:
            image = np.asarray(Image.fromarray(image).resize((self.size[1], self.size[0]), Image.Resampling.LANCZOS))
        return image

    def fingerprint(self) -> Any:
        return self.reader.fingerprint


__all__ = ["CIFARFS", "CIFARFS_SPLITS", "CUB", "FC100", "FC100_SUPERCLASSES", "TieredImageNet", "cub_split"]
