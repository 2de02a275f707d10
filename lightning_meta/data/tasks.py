"""Task distributions: sources that generate each task instead of sampling classes from a dataset."""

from __future__ import annotations

import numpy as np
from torch import Tensor


class TaskDistribution:
    """Base for task families served by :class:`EpisodicDataModule` (regression and other generated tasks).

    Subclasses implement ``sample(rng, n_support, n_query)`` returning one task's
    ``(support_x, support_y, query_x, query_y)``, a pure function of the numpy generator ``rng``.
    """

    def sample(self, rng: np.random.Generator, n_support: int, n_query: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError
