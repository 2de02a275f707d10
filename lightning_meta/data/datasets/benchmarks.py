"""The standard few-shot benchmarks in their published file layouts, with their class splits shipped here (nothing is
downloaded to define a split). Where to get each dataset is in the README ("Datasets").

- :class:`TieredImageNet` (Ren et al. 2018): 608 ImageNet classes, 351/97/160 by 34 super-categories; read from the
  common per-split image folders, the ``{split}_images.npz`` + ``{split}_labels.pkl`` files of MetaOptNet/RFS, or
  the authors' ``{split}_images_png.pkl``; RGB from each (``channel_order="bgr"`` for the published loaders' order).
- :class:`CUB` (Wah et al. 2011): 200 bird species, split 100/50/50 as in Chen et al. 2019 ("A Closer Look").
- :class:`CIFARFS` (Bertinetto et al. 2019) and :class:`FC100` (Oreshkin et al. 2018): CIFAR-100's 100 classes of
  600 images (its train and test files together), split 64/16/20 by class and 60/20/20 by super-class respectively.

All of them keep their decoded images in the decoded-image cache (``cache``, ``decode_workers`` as for
:class:`~lightning_meta.data.ClassFolder`) and give pixels in [0, 1] after the learner's conversion; those read from
image files (CUB, tieredImageNet's image folders) can keep them encoded instead and decode each item when an episode
draws it (``store``, ``decoded_limit``, ``max_open_files`` as for :class:`~lightning_meta.data.ClassFolder`);
:data:`NORMALIZATION` holds the per-dataset mean and std of the published recipes, for a learner's ``normalize=``.
"""

from __future__ import annotations

import io
import mmap
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from lightning_meta._checks import check_choice
from lightning_meta.data.datasets.base import (
    CachedImageDataset,
    FileDecoder,
    ImageDecoder,
    _size,
    decode_image,
    load_images,
)
from lightning_meta.data.datasets.cache import CacheArg, file_fingerprint
from lightning_meta.data.datasets.encoded import Store, check_store
from lightning_meta.data.datasets.folder import ClassFolder, ImageFileDataset, class_files

SPLITS = ("train", "val", "test")
CHANNEL_ORDERS = ("rgb", "bgr")

# Per-channel (mean, std) on the [0, 1] scale, in the form of a learner's ``normalize=(mean, std)``, with which the
# published recipes normalise each dataset (``"<dataset>_<recipe>"``). Each applies its constants to the images in the
# channel order its loader gives (README, "Normalisation"): MetaOptNet and RFS feed tieredImageNet's BGR arrays as they
# are (``TieredImageNet(..., channel_order="bgr")``), every other dataset and recipe RGB.
_MINI_IMAGENET = (tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653)),
                  tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529)))
# ^ kjunelee/MetaOptNet data/mini_imagenet.py and data/tiered_imagenet.py (mean_pix, std_pix); WangYueFt/rfs
#   dataset/mini_imagenet.py and dataset/tiered_imagenet.py (self.mean, self.std)
_CIFAR_METAOPTNET = (tuple(x / 255.0 for x in (129.37731888, 124.10583864, 112.47758569)),
                     tuple(x / 255.0 for x in (68.20947949, 65.43124043, 70.45866994)))
# ^ kjunelee/MetaOptNet data/CIFAR_FS.py and data/FC100.py (mean_pix, std_pix)
_CIFAR_RFS = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))  # WangYueFt/rfs dataset/cifar.py (FC100, CIFAR-FS)
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# ^ wyharveychen/CloserLookFewShot data/datamgr.py (TransformLoader's normalize_param, every dataset);
#   yinboc/few-shot-meta-baseline datasets/tiered_imagenet.py (norm_params, after reversing the npz to RGB)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "miniimagenet_metaoptnet": _MINI_IMAGENET, "tieredimagenet_metaoptnet": _MINI_IMAGENET,
    "cifarfs_metaoptnet": _CIFAR_METAOPTNET, "fc100_metaoptnet": _CIFAR_METAOPTNET,
    "miniimagenet_rfs": _MINI_IMAGENET, "tieredimagenet_rfs": _MINI_IMAGENET,
    "cifarfs_rfs": _CIFAR_RFS, "fc100_rfs": _CIFAR_RFS,
    "miniimagenet_closerlook": _IMAGENET, "cub_closerlook": _IMAGENET,
    "tieredimagenet_metabaseline": _IMAGENET,
}

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
    images, resized to ``image_size`` (84 by default); ``store`` (default ``"decoded"``), ``decoded_limit`` and
    ``max_open_files`` as for :class:`~lightning_meta.data.ClassFolder`.

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
                 decode_workers: Optional[int] = None, store: Store = "decoded", decoded_limit: Optional[int] = None,
                 max_open_files: int = 16) -> None:
        check_choice("split", split, SPLITS)
        check_store("CUB", store)
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
        super().__init__(images, image_size, "RGB", cache, decode_workers, classes=classes, store=store,
                         decoded_limit=decoded_limit, max_open_files=max_open_files)


class TieredImageNet(ImageFileDataset):
    """tieredImageNet (Ren et al. 2018). ``root`` holds one of three layouts per split, looked for in this order:

    - one image folder per split (``train/<wnid>/*.jpg``, ``val/``, ``test/``): the split is the folder, the class
      names are the folder names;
    - MetaOptNet/RFS's ``{split}_images.npz`` (decoded 84x84 images, key ``images``) with ``{split}_labels.pkl``;
    - Ren et al.'s original ``{split}_images_png.pkl`` (a pickled list of PNG-encoded images) with
      ``{split}_labels.pkl``: decoded once into the cache, in parallel (``decode_workers``).

    Channel order: ``channel_order="rgb"`` (default) gives RGB from every layout, as a pretrained backbone expects.
    The ``.npz`` arrays were written by ``cv2`` and hold BGR: ``"bgr"`` gives them as they are (MetaOptNet and RFS
    train on them so; Meta-Baseline reverses them to RGB), and the other layouts reversed to match. It is part of the
    cache key. Per-dataset normalisation constants of the published recipes: :data:`NORMALIZATION`.

    Store: the image folders may be kept encoded (``store="encoded"``: their bytes copied once into a pack, each item
    decoded when an episode draws it, the same pixels in either channel order) or chosen by size (``"auto"``);
    ``store``, ``decoded_limit`` and ``max_open_files`` as for :class:`~lightning_meta.data.ClassFolder`. The ``.npz``
    and ``.pkl`` layouts hold arrays and pickles, which only the decoded store (the default) keeps: ``"auto"`` decodes
    them, ``"encoded"`` is an error.

    Labels: ``label_specific`` (0..C-1 within the split, Ren et al.) is read with its names ``label_specific_str``
    (a list, or a dict keyed by label); ``labels`` (MetaOptNet/RFS, numbering that continues across splits, e.g.
    448..607 for test) is read where ``label_specific`` is absent, and a pickle with both must group the images
    alike. Classes are numbered 0..C-1 in the order of their original label; without names of their own numbering
    they are named ``"<split>/<original label>"``.

    Example:
        >>> import tempfile, pickle
        >>> root = Path(tempfile.mkdtemp())
        >>> np.savez(root / "test_images.npz", images=np.zeros((4, 84, 84, 3), np.uint8))
        >>> _ = (root / "test_labels.pkl").write_bytes(pickle.dumps({"labels": [448, 448, 449, 449]}))
        >>> ds = TieredImageNet(root, "test", cache=False)
        >>> tuple(ds.images.shape), ds.class_names, ds.labels.tolist()
        ((4, 3, 84, 84), ['test/448', 'test/449'], [0, 0, 1, 1])
    """

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 84, cache: CacheArg = True,
                 decode_workers: Optional[int] = None, channel_order: str = "rgb", store: Store = "decoded",
                 decoded_limit: Optional[int] = None, max_open_files: int = 16) -> None:
        check_choice("split", split, SPLITS)
        check_choice("channel_order", channel_order, CHANNEL_ORDERS)
        kind = type(self).__name__
        check_store(kind, store)
        root, size, options = Path(root), _size(image_size), {"split": split, "channel_order": channel_order}
        decoder: ImageDecoder
        if (root / split).is_dir():
            files, label_list, names = _class_folders(root / split)
            # one pack of the files' bytes serves both orders: the decoder reverses the channels of what it decodes
            decoder = FileDecoder(files, size, "RGB", reverse=channel_order == "bgr")
            images, cache_file = load_images(kind, decoder, cache, decode_workers, options=options, store=store,
                                             decoded_limit=decoded_limit, max_open_files=max_open_files)
            super().__init__(images, torch.tensor(label_list), names, cache_file)
            self._keep_files(files)
            return
        labels, npz, png = root / f"{split}_labels.pkl", root / f"{split}_images.npz", root / f"{split}_images_png.pkl"
        if not (labels.is_file() and (npz.is_file() or png.is_file())):
            raise ValueError(f"tieredImageNet {split} split not found in {root}: expected the folder {root / split} of "
                             f"class folders, or {labels.name} with {npz.name} or {png.name}.")
        if store == "encoded":
            held = npz.name if npz.is_file() else png.name
            raise ValueError(f"{kind}: the {split} split is read from {held} (arrays in a pickle or an .npz file), which "
                             "only the decoded store holds: pass `store='decoded'`, or use the image-folder layout "
                             f"({root / split}/<wnid>/*.jpg) to keep the images encoded.")
        label_ids, names = _tiered_labels(labels, split)
        workers: Optional[int] = decode_workers
        if npz.is_file():  # arrays stored BGR, read in order by one process
            reader = _NpzImages(npz)
            count, decoder, stored, workers = reader.count, _ArrayDecoder(reader, size), "bgr", 1
        else:  # PNG files hold RGB; the image count is checked when the file is first decoded
            count, stored = len(label_ids), "rgb"
            decoder = _PngPickle(png, count, size, labels)
        if count != len(label_ids):
            raise ValueError(f"{npz} holds {count} images but {labels} has {len(label_ids)} labels.")
        data, cache_file = load_images(type(self).__name__, _in_order(decoder, stored, channel_order), cache,
                                       workers=workers, options=options)
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


def _class_folders(root: Path) -> tuple[list[str], list[int], list[str]]:
    """The image files of every class folder of ``root`` (folders and files sorted), their labels, the folder names."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"The tieredImageNet split folder {root} has no class folders: put each class's images in a "
                         "folder of its own.")
    # folders of links into ImageNet are often made: class_files names the links whose targets are gone
    files, labels = class_files("TieredImageNet", root, folders)
    return files, labels, [p.name for p in folders]


def _tiered_labels(path: Path, split: str) -> tuple[np.ndarray, list[str]]:
    """Class ids 0..C-1 of the images (``int64 [n]``, in the order of the original labels) and the C class names, from a
    tieredImageNet labels pickle. ``label_specific_str`` names ``label_specific``'s classes, so it is read only with
    that numbering; ``labels`` (MetaOptNet/RFS: numbering continued across splits) gives ``"<split>/<label>"``."""
    table = _unpickle(path)
    if not isinstance(table, dict):
        raise ValueError(f"{path} holds a {type(table).__name__}, not the dict of label arrays of tieredImageNet's "
                         "labels files.")
    table = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in table.items()}
    specific, continued = table.get("label_specific"), table.get("labels")
    if specific is None and continued is None:
        raise ValueError(f"{path} holds no `labels` or `label_specific` entry (it has {sorted(table)}).")
    raw = np.asarray(specific if specific is not None else continued).astype(np.int64).ravel()
    values, ids = np.unique(raw, return_inverse=True)
    if specific is not None and continued is not None:
        other = np.asarray(continued).astype(np.int64).ravel()
        if len(other) != len(raw) or not (len(np.unique(np.stack([raw, other]), axis=1).T) == len(values)
                                          == len(np.unique(other))):
            raise ValueError(f"{path}: `labels` and `label_specific` group the images differently ({len(other)} and "
                             f"{len(raw)} labels): the file is damaged or mixes two splits.")
    strings = table.get("label_specific_str") if specific is not None else None
    if strings is None:
        return ids, [f"{split}/{v}" for v in values.tolist()]
    names = []
    for v in values.tolist():
        if isinstance(strings, dict) and v in strings:
            name = strings[v]
        elif not isinstance(strings, dict) and 0 <= v < len(strings):
            name = strings[v]
        else:
            named = f"{sorted(strings)[:5]}" if isinstance(strings, dict) else f"0..{len(strings) - 1}"
            raise ValueError(f"{path}: `label_specific` has class {v}, but `label_specific_str` names {len(strings)} "
                             f"classes ({named}): the labels file is damaged or mixes two splits.")
        names.append(name.decode("latin1") if isinstance(name, bytes) else str(name))
    return ids, names


def _in_order(decoder: ImageDecoder, stored: str, wanted: str) -> ImageDecoder:
    """``decoder``, or its images with the channels reversed where they are stored in the other order."""
    return decoder if stored == wanted else _ReverseChannels(decoder)


class _ReverseChannels:
    """Another decoder's ``uint8 [H, W, 3]`` images with their channels reversed (RGB <-> BGR); picklable if it is."""

    def __init__(self, decoder: ImageDecoder) -> None:
        self.decoder = decoder
        self.sources, self.size, self.mode, self.invert = decoder.sources, decoder.size, decoder.mode, decoder.invert

    def __call__(self, i: int) -> np.ndarray:
        return self.decoder(i)[:, :, ::-1]

    def name(self, i: int) -> str:
        return self.decoder.name(i)

    def fingerprint(self) -> Any:
        return self.decoder.fingerprint()


_PNG = b"\x89PNG\r\n\x1a\n"
# the pickle opcodes that hold raw bytes, by the width of their length field: BINBYTES8 and BYTEARRAY8; BINBYTES and
# BINSTRING (Python 2's str, as Ren et al.'s file holds); SHORT_BINBYTES and SHORT_BINSTRING
_BYTES_OPCODES = {8: (0x8E, 0x96), 4: (ord("B"), ord("T")), 1: (ord("C"), ord("U"))}


class _PngPickle:
    """Item ``i`` of a pickled list of PNG-encoded images (Ren et al.'s ``{split}_images_png.pkl``: ``cv2.imencode``'s
    ``uint8 [n, 1]`` arrays in a Python 2 pickle; or ``bytes``) decoded to ``uint8 [H, W, 3]`` RGB. The list is not
    unpickled: the file is memory-mapped and each PNG found as the raw bytes of the pickle opcode that holds it (an
    index built once per decoding process, on first use; the page cache holds one copy for all of them). A pickle
    that stores its images otherwise is unpickled whole. Picklable, so the cache's worker pool shares the work."""

    def __init__(self, path: Path, count: int, size: Optional[tuple[int, int]], labels: Path) -> None:
        self.path, self.labels, self.size, self.mode, self.invert = str(path), str(labels), size, "RGB", False
        self.sources = range(count)
        self._data: Any = None  # the mapped file (or the unpickled images joined), and each image's [start, stop)
        self._spans = np.zeros((0, 2), np.int64)

    def name(self, i: int) -> str:
        return f"image {i} of {self.path}"

    def fingerprint(self) -> Any:
        return file_fingerprint([self.path])

    def __call__(self, i: int) -> np.ndarray:
        if self._data is None:
            self._data, self._spans = self._open()
        start, stop = self._spans[i].tolist()
        return decode_image(io.BytesIO(self._data[start:stop]), self.name(i), self.size, self.mode)

    def _open(self) -> tuple[Any, np.ndarray]:
        with open(self.path, "rb") as f:
            data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else b""
        spans = _png_spans(data)
        if len(spans) != len(self.sources):  # not raw bytes (e.g. Python 3 at protocol 2): unpickle the list
            items = _unpickle(Path(self.path))
            if not isinstance(items, (list, tuple)):
                raise ValueError(f"{self.path} holds a {type(items).__name__}, not a pickled list of PNG images.")
            parts = [_as_bytes(x) for x in items]
            stops = np.cumsum([len(b) for b in parts], dtype=np.int64)
            data, spans = b"".join(parts), np.stack([stops - [len(b) for b in parts], stops], axis=1)
        if len(spans) != len(self.sources):
            raise ValueError(f"{self.path} holds {len(spans)} images but {self.labels} has {len(self.sources)} labels.")
        return data, spans

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_data": None}  # a process that unpickles it opens the file itself


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, str):  # Python 2's str, unpickled as latin-1
        return item.encode("latin1")
    return bytes(item) if isinstance(item, (bytes, bytearray)) else np.asarray(item, np.uint8).tobytes()


def _png_spans(data: Any) -> np.ndarray:
    """``[start, stop)`` (``int64 [n, 2]``) of every PNG image that a pickle opcode holds as raw bytes in ``data``."""
    spans = []
    at = data.find(_PNG)
    while at >= 0:
        length = 0
        for width, opcodes in _BYTES_OPCODES.items():
            if at > width and data[at - width - 1] in opcodes:
                held = int.from_bytes(data[at - width:at], "little")
                if len(_PNG) + 12 <= held <= len(data) - at and data[at + held - 8:at + held - 4] == b"IEND":
                    length = held  # the opcode's bytes are exactly one PNG file (it ends with its IEND chunk)
                    break
        if length:
            spans.append((at, at + length))
        at = data.find(_PNG, at + max(length, 1))
    return np.asarray(spans, np.int64).reshape(-1, 2)


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


__all__ = ["CHANNEL_ORDERS", "CIFARFS", "CIFARFS_SPLITS", "CUB", "FC100", "FC100_SUPERCLASSES", "NORMALIZATION",
           "TieredImageNet", "cub_split"]
