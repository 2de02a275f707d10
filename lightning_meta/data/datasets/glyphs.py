"""SyntheticGlyphs: procedurally drawn stroke characters, deterministic from a seed, no download."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_meta._checks import check_choice, check_int
from lightning_meta.data.datasets.base import CachedImageDataset

SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
DEFAULT_CLASSES = {"train": 800, "val": 100, "test": 200}


class SyntheticGlyphs(CachedImageDataset):
    """Omniglot-like characters drawn from random strokes: each class is a glyph of 2-4 curved strokes; each item
    redraws it with jittered control points, a small random affine transform and a random pen width.

    Classes of the ``train``, ``val`` and ``test`` splits come from disjoint ranges of glyph ids, so the splits never
    share a class; every glyph and every drawing is a pure function of ``seed``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_classes: glyphs in this split (default 800 / 100 / 200).
        samples_per_class: drawings of each glyph.
        image_size: side of the square ``[1, S, S]`` images.
        seed: the glyph alphabet; two datasets with the same arguments are identical.

    Example:
        >>> ds = SyntheticGlyphs("test", num_classes=5, samples_per_class=4)
        >>> ds.images.shape, ds.labels.tolist()[:6], ds.class_names[0]
        (torch.Size([20, 1, 28, 28]), [0, 0, 0, 0, 1, 1], 'glyph-s0-2000000')
    """

    def __init__(
        self,
        split: str = "train",
        num_classes: Optional[int] = None,
        samples_per_class: int = 20,
        image_size: int = 28,
        seed: int = 0,
    ) -> None:
        check_choice("split", split, SPLIT_OFFSET)
        num_classes = DEFAULT_CLASSES[split] if num_classes is None else num_classes
        for name, value in (("num_classes", num_classes), ("samples_per_class", samples_per_class),
                            ("image_size", image_size)):
            check_int(name, value, 1)
        self.split, self.seed = split, seed
        ids = [SPLIT_OFFSET[split] + c for c in range(num_classes)]
        images = np.empty((num_classes * samples_per_class, 1, image_size, image_size), dtype=np.uint8)
        for c, glyph_id in enumerate(ids):
            strokes = _glyph(np.random.default_rng([seed, glyph_id]))
            for s in range(samples_per_class):
                rng = np.random.default_rng([seed, glyph_id, s + 1])
                images[c * samples_per_class + s, 0] = _draw(strokes, rng, image_size)
        labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
        super().__init__(torch.from_numpy(images), labels, [f"glyph-s{seed}-{i}" for i in ids])


def _glyph(rng: np.random.Generator) -> list[np.ndarray]:
    """A glyph: 2-4 strokes, each a quadratic Bezier through 3 control points in the unit square."""
    return [rng.uniform(0.15, 0.85, size=(3, 2)) for _ in range(rng.integers(2, 5))]


def _draw(strokes: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    scale = 2 * size  # draw at twice the size, then downsample for anti-aliasing
    angle = rng.normal(0, 0.15)
    zoom = rng.uniform(0.85, 1.1)
    shift = rng.normal(0, 0.04, size=2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * zoom
    width = int(round(rng.uniform(0.06, 0.1) * scale))
    t = np.linspace(0, 1, 12)[:, None]
    img = Image.new("L", (scale, scale), 0)
    pen = ImageDraw.Draw(img)
    for ctrl in strokes:
        p = ctrl + rng.normal(0, 0.035, size=ctrl.shape)
        curve = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
        curve = (curve - 0.5) @ rot.T + 0.5 + shift
        pen.line([tuple(q) for q in (curve * scale).tolist()], fill=255, width=width)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
