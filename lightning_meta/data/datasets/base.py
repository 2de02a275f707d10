"""In-memory image datasets: decoded, resized images cached as one uint8 tensor, so an episode is one gather."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset


class CachedImageDataset(Dataset):
    """Images held as one ``uint8`` tensor ``[n, C, H, W]`` with integer ``labels`` and readable ``class_names``.

    Items are ``(float image in [0, 1], label)``; :meth:`gather` loads many items with one index operation.

    Example:
        >>> ds = CachedImageDataset(torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["a", "b"])
        >>> ds[2][1], ds.gather(torch.tensor([0, 3])).shape, ds.num_classes
        (1, torch.Size([2, 1, 2, 2]), 2)
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str]) -> None:
        self.images, self.labels, self.class_names = images, labels.long(), list(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

    def gather(self, indices: Tensor) -> Tensor:
        return self.images.index_select(0, indices).float().div_(255)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.images.shape[1:]))
        return f"{type(self).__name__}({self.num_classes} classes, {len(self)} images of {shape})"


def _size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        if image_size < 1:
            raise ValueError(f"Expected `image_size` to be a positive integer, but got {image_size}.")
        return (image_size, image_size)
    return tuple(int(s) for s in image_size)  # type: ignore[return-value]


def decode_image(source, name: str, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    """Decode one image file (a path or a binary file object) to ``uint8 [H, W, C]``; a broken file is named."""
    try:
        with Image.open(source) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read the image file {name}: {err}. Remove or replace the corrupt file.") from err
    return array[:, :, None] if array.ndim == 2 else array


def stack_images(arrays: list[np.ndarray], names: list[str]) -> Tensor:
    """Stack decoded images into ``uint8 [n, C, H, W]``; images of different sizes need ``image_size``."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(n for a, n in zip(arrays, names) if a.shape != first)
        raise ValueError(
            f"Images differ in size ({names[0]} is {first[1]}x{first[0]}, {odd} is not): pass `image_size` to "
            "resize them all to one size."
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def is_image(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
