"""ClassFolder: one sub-folder per class, any image type."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_meta.data.datasets.base import CachedImageDataset, FileDecoder, _size, is_image, load_images
from lightning_meta.data.datasets.cache import CacheArg
from lightning_meta.data.datasets.encoded import EncodedImages, Store, check_store


class ImageFileDataset(CachedImageDataset):
    """A :class:`CachedImageDataset` read from image files, with ``files``: the file behind each item, in item order.
    The decoded store keeps the list made at construction (its images fit in memory, so do their paths); the encoded
    store, for folders of millions of files, keeps no list of paths in the dataset (nor in each DataLoader worker it is
    copied to): ``files`` reads them from the pack, a new list each time it is asked for."""

    _files: Optional[list[str]] = None

    @property
    def files(self) -> list[str]:
        if isinstance(self.images, EncodedImages):
            return self.images.decoder.items.names()
        if self._files is None:
            raise AttributeError(f"{type(self).__name__} read its images from arrays, not image files: it has no "
                                 "`files`.")
        return self._files

    def _keep_files(self, files: list[str]) -> None:
        self._files = None if isinstance(self.images, EncodedImages) else files


class ClassFolder(ImageFileDataset):
    """Every sub-folder of ``root`` is a class; every image file inside it is an item (decoded once per machine).

    Args:
        root: the folder of class folders.
        image_size: resize every image to this side (or ``(H, W)``); needed when the images differ in size.
        mode: PIL mode to convert to (``"RGB"`` gives 3 channels, ``"L"`` one).
        cache: where the decoded images are kept: ``True`` (default) a memory-mapped file in the default cache folder
            (``$LIGHTNING_META_CACHE``, else ``~/.cache/lightning_meta/images``), shared by every process and run on
            the machine and rebuilt when the files or options change; a folder path to keep it there; ``False`` to
            decode into this process's memory (tiny data).
        decode_workers: processes that decode a new cache (default: every core this process may use).
        classes: keep only these class folders (names), e.g. one split of a benchmark; ``None`` keeps all.
        store: ``"decoded"`` (default) decodes every image once into the decoded-image cache (one memory-mapped
            ``uint8`` file per machine: the fastest sampling); ``"encoded"`` copies the image files' bytes once into
            one *pack* in the cache folder (one file, one descriptor, whatever the number of images) and decodes each
            item when an episode draws it, in the DataLoader workers, with the same decoder and resize (the same
            pixels; for folders too big to decode whole, e.g. ImageNet-21k); ``"auto"`` decodes when the decoded size
            ``n x C x H x W`` bytes fits under ``decoded_limit``, else keeps the images encoded, and logs its choice.
            ``"encoded"`` needs ``image_size`` and a cache folder, ``"auto"`` ``image_size``.
        decoded_limit: bytes, for ``store="auto"``; default: half the free space of the cache's disk and half the
            memory, the smaller. It bounds what ``"auto"`` decodes: a decoded cache already there is used.
        max_open_files: the files a process keeps open at once for the encoded store (it reads with ``pread``).

    Class names are ``<root name>/<class folder>``'s folder part, so two ``ClassFolder`` splits with a class folder of
    the same name are reported as overlapping.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for c in ("cat", "dog"):
        ...     (root / c).mkdir()
        ...     for i in range(3):
        ...         Image.new("RGB", (10, 8)).save(root / c / f"{i}.png")
        >>> ds = ClassFolder(root, image_size=6)
        >>> ds.class_names, tuple(ds.images.shape), ds.labels.tolist()
        (['cat', 'dog'], (6, 3, 6, 6), [0, 0, 0, 1, 1, 1])
    """

    def __init__(self, root: Union[str, Path], image_size: Optional[Union[int, tuple[int, int]]] = None,
                 mode: str = "RGB", cache: CacheArg = True, decode_workers: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, store: Store = "decoded",
                 decoded_limit: Optional[int] = None, max_open_files: int = 16) -> None:
        root = Path(root)
        check_store(type(self).__name__, store)
        if not root.is_dir():
            raise ValueError(f"ClassFolder root {root} does not exist or is not a folder: it should hold one folder "
                             "per class.")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"ClassFolder root {root} has no class folders: put each class's images in a folder of "
                             "its own.")
        if classes is not None:
            missing = sorted(set(classes) - {p.name for p in folders})
            if missing:
                raise ValueError(f"{type(self).__name__}: {len(missing)} class folders are missing from {root} (e.g. "
                                 f"{', '.join(missing[:3])}): is `root` the dataset's image folder, and is it whole?")
            folders = [p for p in folders if p.name in set(classes)]
        files, labels = class_files(type(self).__name__, root, folders)
        images, cache_file = load_images(type(self).__name__, FileDecoder(files, _size(image_size), mode), cache,
                                         decode_workers, store=store, decoded_limit=decoded_limit,
                                         max_open_files=max_open_files)
        super().__init__(images, torch.tensor(labels), [p.name for p in folders], cache_file)
        self._keep_files(files)


def class_files(kind: str, root: Path, folders: Sequence[Path]) -> tuple[list[str], list[int]]:
    """The image files under each class folder (sorted; class ``i`` = ``folders[i]``) and their labels; a folder with
    no image is an error, dangling symbolic links are skipped with one warning naming them."""
    files: list[str] = []
    labels: list[int] = []
    dangling: list[str] = []
    for label, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if is_image(p))
        dangling += [str(p) for p in found if p.is_symlink() and not p.exists()]
        images = [str(p) for p in found if p.is_file()]
        if not images:
            raise ValueError(f"The class folder {folder} holds no image files.")
        files += images
        labels += [label] * len(images)
    warn_dangling(kind, root, dangling)
    return files, labels


def warn_dangling(kind: str, root: Path, dangling: list[str]) -> None:
    """One warning naming the dangling symbolic links (their targets do not exist) that ``kind`` skipped."""
    if dangling:
        more = f" and {len(dangling) - 5} more" if len(dangling) > 5 else ""
        rank_zero_warn(f"{kind} skips {len(dangling)} dangling symlink{'s' if len(dangling) > 1 else ''} under {root} "
                       f"(their targets do not exist): {', '.join(dangling[:5])}{more}. Restore the targets, or remove "
                       "the links.")
