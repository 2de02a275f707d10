"""Sinusoid regression tasks (Finn et al., 2017, section 5.1)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.tasks import TaskDistribution


class Sinusoid(TaskDistribution):
    """Tasks ``y = A sin(x - phi)`` with ``A ~ U[0.1, 5.0]``, ``phi ~ U[0, pi]`` and ``x ~ U[-5, 5]``.

    Each task gives ``support_x [n_support, 1]``, float ``support_y [n_support]`` and the same for the query. Served
    by :class:`EpisodicDataModule` with ``n_way=1``: ``n_shot`` is the paper's K.

    Example:
        >>> sx, sy, qx, qy = Sinusoid().sample(np.random.default_rng(0), 10, 5)
        >>> sx.shape, sy.shape, qx.shape, bool(sy.abs().max() <= 5.0)
        (torch.Size([10, 1]), torch.Size([10]), torch.Size([5, 1]), True)
    """

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"Expected `{name}` to be a (low, high) range with low <= high, but got {(lo, hi)}.")
        self.amplitude, self.phase, self.x_range = ((float(lo), float(hi)) for lo, hi in (amplitude, phase, x_range))

    def sample(self, rng: np.random.Generator, n_support: int, n_query: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        amp = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = torch.from_numpy(rng.uniform(*self.x_range, size=(n_support + n_query, 1)).astype(np.float32))
        y = amp * torch.sin(x[:, 0] - phase)
        return x[:n_support], y[:n_support], x[n_support:], y[n_support:]

    def __repr__(self) -> str:
        return f"Sinusoid(amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})"
