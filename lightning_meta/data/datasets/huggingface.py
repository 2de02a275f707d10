"""Hugging Face ``datasets`` as an episodic source: labels from the label column, images through the decoded-image
cache."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_meta.data.datasets.base import CachedImageDataset, _size, decode_image, load_images
from lightning_meta.data.datasets.cache import CacheArg


def is_huggingface_dataset(source: Any) -> bool:
    """Whether ``source`` is a ``datasets.Dataset`` (checked without importing ``datasets``)."""
    return any(c.__module__.startswith("datasets.") and c.__name__ == "Dataset" for c in type(source).__mro__)


class HuggingFaceImages(CachedImageDataset):
    """A Hugging Face ``datasets.Dataset`` (one split of a ``DatasetDict``) with an image column and a label column.

    The labels are read from the label column alone (no image is decoded for them); class names come from a
    ``ClassLabel`` feature where there is one. The images are decoded once per machine into the decoded-image cache
    (``cache``, ``decode_workers`` as for :class:`~lightning_meta.data.ClassFolder`), keyed by the dataset's own
    fingerprint. :class:`~lightning_meta.EpisodicDataModule` wraps a ``datasets.Dataset`` passed as a source in this
    class with its defaults.

    Args:
        dataset: the ``datasets.Dataset``.
        image_column, label_column: the columns holding the images (an ``Image`` feature, or paths / encoded bytes)
            and the integer (or string) class labels.
        image_size: resize every image to this side (or ``(H, W)``); needed when the images differ in size.
        mode: PIL mode of the images (``"RGB"`` or ``"L"``).
    """

    def __init__(self, dataset: Any, image_column: str = "image", label_column: str = "label",
                 image_size: Optional[Union[int, tuple[int, int]]] = None, mode: str = "RGB", cache: CacheArg = True,
                 decode_workers: Optional[int] = None) -> None:
        if not is_huggingface_dataset(dataset):
            kind = type(dataset).__name__
            hint = " (pick one split: dataset['train'])" if kind == "DatasetDict" else ""
            raise TypeError(f"Expected a Hugging Face `datasets.Dataset`, but got {kind}{hint}.")
        for role, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in dataset.column_names:
                raise ValueError(f"`{role}`={column!r} is not a column of the dataset; its columns are "
                                 f"{dataset.column_names}.")
        raw = np.asarray(list(dataset[label_column]))
        if raw.dtype.kind in "USO":
            names_found, labels = np.unique(raw.astype(str), return_inverse=True)
            names = [str(n) for n in names_found]
        else:
            values, labels = np.unique(raw.astype(np.int64), return_inverse=True)
            feature_names = getattr(dataset.features[label_column], "names", None)
            names = [str(feature_names[v]) if feature_names else str(v) for v in values]
        decoder = _ColumnDecoder(dataset, image_column, _size(image_size), mode)
        images, cache_file = load_images(type(self).__name__, decoder, cache, decode_workers)
        super().__init__(images, torch.from_numpy(labels.reshape(-1)), names, cache_file)


class _ColumnDecoder:
    """Decodes row ``i`` of a dataset's image column (the column read undecoded: bytes or a path) to ``uint8``."""

    def __init__(self, dataset: Any, column: str, size: Optional[tuple[int, int]], mode: str) -> None:
        from datasets import Image

        feature = dataset.features[column]
        self.dataset = dataset.select_columns([column])
        if isinstance(feature, Image):
            self.dataset = self.dataset.cast_column(column, Image(decode=False))
        self.column, self.size, self.mode, self.invert = column, size, mode, False
        self.sources = range(len(dataset))

    def name(self, i: int) -> str:
        return f"row {i} of the dataset's {self.column!r} column"

    def __call__(self, i: int) -> np.ndarray:
        value = self.dataset[i][self.column]
        if isinstance(value, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            value = value["bytes"] if value.get("bytes") is not None else value["path"]
        if isinstance(value, bytes):
            value = io.BytesIO(value)
        elif isinstance(value, str):
            value = Path(value)
        elif not hasattr(value, "read"):
            raise ValueError(f"{self.name(i)} holds {type(value).__name__}: expected an image (bytes or a file path).")
        return decode_image(value, self.name(i), self.size, self.mode)

    def fingerprint(self) -> Any:
        fingerprint = getattr(self.dataset, "_fingerprint", None)  # the datasets library's digest of its content
        if fingerprint is None:
            raise ValueError("This datasets.Dataset has no fingerprint to key the image cache with: pass cache=False.")
        return [fingerprint, len(self.dataset)]
