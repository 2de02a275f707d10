"""Task distributions: sources that generate each task instead of sampling classes from a dataset."""

from __future__ import annotations

import numpy as np
from torch import Tensor


class TaskDistribution:
    """Base for task families served by :class:`EpisodicDataModule` (regression and other generated tasks).

    Subclasses implement ``sample(rng, n_support, n_query)`` returning one task's
    ``(support_x, support_y, query_x, query_y)``, a pure function of the numpy generator ``rng``.

    Example (a family of constant functions; float targets mean regression):
        >>> import torch
        >>> class Constants(TaskDistribution):
        ...     def sample(self, rng, n_support, n_query):
        ...         c = float(rng.uniform(-1, 1))
        ...         x = torch.zeros(n_support + n_query, 1)
        ...         return x[:n_support], torch.full((n_support,), c), x[n_support:], torch.full((n_query,), c)
        >>> sx, sy, qx, qy = Constants().sample(np.random.default_rng(0), 3, 2)
        >>> bool(torch.equal(sy[:2], qy)), tuple(sx.shape)
        (True, (3, 1))
    """

    def sample(self, rng: np.random.Generator, n_support: int, n_query: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError
