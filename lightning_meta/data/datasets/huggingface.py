"""Hugging Face ``datasets`` as an episodic source: labels from the label column, images through the decoded-image
cache."""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_meta.data.datasets.base import CachedImageDataset, _size, decode_image, load_images
from lightning_meta.data.datasets.cache import CacheArg, file_fingerprint


def is_huggingface_dataset(source: Any) -> bool:
    """Whether ``source`` is a ``datasets.Dataset`` (checked without importing ``datasets``)."""
    return any(c.__module__.startswith("datasets.") and c.__name__ == "Dataset" for c in type(source).__mro__)


class HuggingFaceImages(CachedImageDataset):
    """A Hugging Face ``datasets.Dataset`` (one split of a ``DatasetDict``) with an image column and a label column.

    The labels are read from the label column alone (no image is decoded for them); class names come from a
    ``ClassLabel`` feature or string labels; plain integer labels have none (``class_names`` is ``None``), so two
    splits that each number their classes from 0 are not taken as sharing classes. The images are decoded once per
    machine into the decoded-image cache (``cache``, ``decode_workers`` as for
    :class:`~lightning_meta.data.ClassFolder`), keyed by the files where the column names files, else by the dataset's
    own fingerprint.
    :class:`~lightning_meta.EpisodicDataModule` wraps a ``datasets.Dataset`` passed as a source in this class with its
    defaults.

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
        names: Optional[list[str]] = None  # plain integer labels are numbers, not names: no identity across splits
        if raw.dtype.kind in "USO":
            names_found, labels = np.unique(raw.astype(str), return_inverse=True)
            names = [str(n) for n in names_found]
        else:
            values, labels = np.unique(raw.astype(np.int64), return_inverse=True)
            feature_names = getattr(dataset.features[label_column], "names", None)
            if feature_names:
                names = [str(feature_names[v]) for v in values]
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
        """What the images depend on, row by row: a row that names a file (a path, or an ``Image`` without bytes) by
        that file's size, times and inode (:func:`~lightning_meta.data.datasets.cache.file_fingerprint`), so a changed
        file builds a new cache; rows that hold their bytes by the dataset's fingerprint (the datasets library's digest
        of its content and of the steps that made it, row order included)."""
        paths = self._paths()
        files = file_fingerprint([p for p in paths if p is not None])
        if len(files) == len(paths):  # every row a file: the files alone, in order
            return ["files", files]
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        if fingerprint is None:
            raise ValueError("This datasets.Dataset has no fingerprint to key the image cache with: pass cache=False.")
        return [fingerprint, len(self.dataset), [i for i, p in enumerate(paths) if p is not None], files]

    def _paths(self) -> list[Optional[str]]:
        """Each row's file path, or ``None`` where the row holds the image's bytes (read as Arrow, nothing decoded)."""
        pa, pc = importlib.import_module("pyarrow"), importlib.import_module("pyarrow.compute")  # under `datasets`

        paths: list[Optional[str]] = []
        for batch in self.dataset.with_format("arrow").iter(batch_size=8192):
            column = batch.column(self.column)
            if pa.types.is_struct(column.type):  # an undecoded Image: {bytes, path}, the bytes win where present
                named = pc.struct_field(column, "path").to_pylist()
                embedded = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
                paths += [None if b else p for p, b in zip(named, embedded)]
            elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                paths += column.to_pylist()
            else:
                paths += [None] * len(column)
        return paths
