"""Augmentations of training episodes, applied to whole meta-batches with a generator derived from the episodes'
coordinates, so augmented runs stay reproducible and resume exactly."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta._checks import check_int


class RandomShift:
    """Translate every image by a random whole number of pixels in ``[-max_shift, max_shift]`` along each axis, with
    zero fill (blank background for Omniglot-style strokes).

    What it is worth on the small Omniglot split is measured in the README ("Measured results").

    Example:
        >>> x = torch.zeros(1, 1, 1, 9, 9); x[..., 4, 4] = 1.0
        >>> out = RandomShift(2)(x, torch.Generator().manual_seed(0))
        >>> out.shape, out.sum().item()          # the pixel moved by at most 2 in each direction, nothing was lost
        (torch.Size([1, 1, 1, 9, 9]), 1.0)
    """

    def __init__(self, max_shift: int = 3) -> None:
        check_int("max_shift", max_shift, 0)
        self.max_shift = max_shift

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() < 3:
            raise ValueError(f"RandomShift needs images [..., C, H, W], but the episode inputs have shape "
                             f"{tuple(x.shape)}: use it only with image datasets.")
        if self.max_shift == 0:
            return x
        *lead, c, h, w = x.shape
        flat = x.reshape(-1, c, h, w)
        n, p = flat.shape[0], self.max_shift
        padded = torch.nn.functional.pad(flat, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # [n, h, w, c]
        return out.permute(0, 3, 1, 2).reshape(*lead, c, h, w).contiguous()

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"
