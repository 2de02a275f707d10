"""TensorClassDataset: labelled tensors as an episodic source."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class TensorClassDataset(Dataset):
    """Wrap inputs ``x [n, ...]`` and integer labels ``y [n]`` as a dataset of ``(x, label)`` items. Labels may also
    be class names (strings), numbered in sorted order (they become the ``class_names``).

    ``uint8`` inputs (images) stay ``uint8`` in episodes, a quarter of float32's bytes on their way to the device,
    where the learner converts them to floats in [0, 1]; a single item is served as floats.

    Give ``class_names`` (one per distinct label) so the data module can check that train, validation and test
    classes are disjoint: classes are identified by name, and integer labels alone are numbers, not names
    (``class_names`` is ``None``), so splits that each number their classes from 0 are not taken as sharing classes.

    Example:
        >>> ds = TensorClassDataset(torch.zeros(6, 2), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> len(ds), ds[3][1], ds.gather(torch.tensor([0, 5])).shape
        (6, 1, torch.Size([2, 2]))
    """

    def __init__(self, x: Tensor, y: Tensor, class_names: Optional[Sequence[str]] = None) -> None:
        if not isinstance(y, Tensor) and np.asarray(y).dtype.kind in "USO":  # class names as labels: numbered
            names, y = np.unique(np.asarray(y).astype(str), return_inverse=True)
            class_names = list(names) if class_names is None else class_names
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if y.ndim != 1 or y.is_floating_point() or y.is_complex():
            raise ValueError(f"Expected `y` to be a 1-D tensor of integer labels, but got shape {tuple(y.shape)} "
                             f"and dtype {y.dtype}.")
        if len(x) != len(y):
            raise ValueError(f"`x` has {len(x)} items but `y` has {len(y)} labels: they must match one to one.")
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
            raise ValueError(f"`x` contains NaN or infinite values (first at item {bad}): clean the inputs first.")
        self.x, self.labels = x, y.long()
        self.class_names: Optional[list[str]] = None
        if class_names is not None:
            n = int(torch.unique(y).numel())
            if len(class_names) != n:
                raise ValueError(f"`class_names` has {len(class_names)} names but `y` has {n} distinct labels.")
            self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: Tensor) -> Tensor:
        return self.x[indices]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.x[index]
        return x.float().div_(255) if x.dtype == torch.uint8 else x, int(self.labels[index])
