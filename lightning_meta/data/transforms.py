"""Augmentations of training episodes, applied to whole meta-batches with a generator derived from the episodes'
coordinates, so augmented runs stay reproducible and resume exactly."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta._checks import check_int


def _images(x: Tensor, name: str) -> None:
    if x.dim() < 3:
        raise ValueError(f"{name} needs images [..., C, H, W], but the episode inputs have shape {tuple(x.shape)}: "
                         "use it only with image datasets.")


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
        _images(x, "RandomShift")
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


class RandomAffine:
    """A random affine distortion of every image, each its own draw (Koch et al. 2015 used these on Omniglot):
    rotation by up to ``degrees``, translation by up to ``translate`` of the side, scaling by a factor in
    ``[1 - scale, 1 + scale]`` and horizontal shear by up to ``shear`` degrees, bilinear, zero fill (blank background
    for Omniglot-style strokes). torchvision's ``transforms.v2.functional.affine`` does the resampling; the parameters
    come from the episode's generator, so augmented runs are reproducible and resume exactly. Needs torchvision
    (``pip install 'lightning-meta[vision]'``).

    Example:
        >>> x = torch.zeros(1, 2, 1, 9, 9); x[..., 3:6, 3:6] = 1.0
        >>> out = RandomAffine(degrees=10, translate=0.1)(x, torch.Generator().manual_seed(0))
        >>> out.shape, torch.equal(out, RandomAffine(degrees=10, translate=0.1)(x, torch.Generator().manual_seed(0)))
        (torch.Size([1, 2, 1, 9, 9]), True)
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: float = 0.1, shear: float = 10.0) -> None:
        for name, value in (("degrees", degrees), ("translate", translate), ("scale", scale), ("shear", shear)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Expected `{name}` to be a number >= 0, but got {value!r}.")
        if scale >= 1:
            raise ValueError(f"Expected `scale` to be below 1 (factors in [1 - scale, 1 + scale]), but got {scale!r}.")
        self.degrees, self.translate, self.scale, self.shear = float(degrees), float(translate), float(scale), float(shear)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _images(x, "RandomAffine")
        try:
            from torchvision.transforms.v2 import functional as tvf
        except ImportError as err:
            raise ImportError("RandomAffine needs torchvision: pip install 'lightning-meta[vision]'.") from err
        *lead, c, h, w = x.shape
        flat = x.reshape(-1, c, h, w)
        u = (torch.rand(flat.shape[0], 5, generator=generator, dtype=torch.float64) * 2 - 1).tolist()  # [-1, 1)
        out = [tvf.affine(img, angle=a * self.degrees, translate=[tx * self.translate * w, ty * self.translate * h],
                          scale=1 + s * self.scale, shear=[sh * self.shear, 0.0],
                          interpolation=tvf.InterpolationMode.BILINEAR, fill=0.0)
               for img, (a, tx, ty, s, sh) in zip(flat, u)]
        return torch.stack(out).reshape(*lead, c, h, w)

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
                f"shear={self.shear})")
