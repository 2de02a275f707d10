"""ClassFolder: one sub-folder per class, any image type."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from lightning_meta.data.datasets.base import CachedImageDataset, _size, decode_image, is_image, stack_images


class ClassFolder(CachedImageDataset):
    """Every sub-folder of ``root`` is a class; every image file inside it is an item (decoded once, cached).

    Args:
        root: the folder of class folders.
        image_size: resize every image to this side (or ``(H, W)``); needed when the images differ in size.
        mode: PIL mode to convert to (``"RGB"`` gives 3 channels, ``"L"`` one).

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
                 mode: str = "RGB") -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"ClassFolder root {root} does not exist or is not a folder: it should hold one folder "
                             "per class.")
        classes = sorted(p for p in root.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"ClassFolder root {root} has no class folders: put each class's images in a folder of "
                             "its own.")
        size = _size(image_size)
        arrays, labels, files, names = [], [], [], []
        for label, folder in enumerate(classes):
            images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))
            if not images:
                raise ValueError(f"The class folder {folder} holds no image files.")
            for path in images:
                arrays.append(decode_image(path, str(path), size, mode))
                labels.append(label)
                files.append(str(path))
            names.append(folder.name)
        super().__init__(stack_images(arrays, files), torch.tensor(labels), names)
        self.files = files
