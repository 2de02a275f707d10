"""The one batch type every learner consumes."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_meta.functional.episode import episode_accuracy, per_task_loss, target_ndim


class Episode(NamedTuple):
    """A few-shot task, or a meta-batch of them.

    Batched (what a learner's step receives), with B tasks, N ways, K shots and Q queries per class:

    - ``support_x``: ``[B, N*K, ...]`` inputs to adapt on
    - ``support_y``: ``[B, N*K]`` integer class labels ``0..N-1`` (classification) or float targets (regression)
    - ``query_x``: ``[B, N*Q, ...]`` inputs to be judged on
    - ``query_y``: ``[B, N*Q]`` labels or targets of the queries

    A single task (what :meth:`MetaLearner.adapt` takes) has the same fields without the leading ``B``.

    Example:
        >>> ep = Episode(torch.zeros(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...              torch.zeros(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> ep.num_tasks, ep.num_ways, ep.is_regression
        (2, 5, False)
        >>> ep.task(1).support_x.shape
        torch.Size([5, 1, 28, 28])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """The meta-batch size ``B`` of a batched episode."""
        return int(self.support_x.shape[0])

    @property
    def is_regression(self) -> bool:
        """Floating-point targets mean regression; integer labels mean classification."""
        return bool(torch.is_floating_point(self.support_y))

    @property
    def num_ways(self) -> int:
        """Number of classes ``N`` (largest support label + 1); 1 for regression."""
        if self.is_regression:
            return 1
        return int(self.support_y.max()) + 1 if self.support_y.numel() else 0

    def task(self, index: int) -> Episode:
        """The ``index``-th task of a batched episode, without the batch dimension."""
        return Episode(*(t[index] for t in self))

    def to(self, *args, **kwargs) -> Episode:
        """Move every field, like :meth:`torch.Tensor.to`."""
        return Episode(*(t.to(*args, **kwargs) for t in self))

    def task_losses(self, outputs: Tensor) -> Tensor:
        """``[B]``: each task's mean query loss (cross-entropy, or MSE for regression) from outputs ``[B, M, ...]``;
        what :class:`~lightning_meta.data.RaggedEpisode` computes for tasks of different shapes."""
        return per_task_loss(outputs, self.query_y, target_ndim(self.query_y, 1))

    def task_accuracies(self, outputs: Tensor) -> Tensor:
        """``[B]``: each task's query accuracy from logits ``[B, M, N]``."""
        return episode_accuracy(outputs, self.query_y)

    def task_finite(self, outputs: Tensor) -> Tensor:
        """``[B]``: whether every output of the task is finite (a diverged task has NaN)."""
        return torch.isfinite(outputs.detach().flatten(1).float()).all(1)


class LabelledBatch(NamedTuple):
    """A batch of labelled examples for supervised pretraining (what ``EpisodicDataModule(pretrain_batch_size=...)``
    yields for training and :class:`~lightning_meta.Pretrainer` trains on): inputs ``x [n, ...]`` and their classes
    ``y [n]``, numbered ``0..C-1`` over all the training dataset's classes.

    Example:
        >>> batch = LabelledBatch(torch.zeros(4, 1, 28, 28), torch.tensor([0, 3, 1, 3]))
        >>> batch.x.shape, batch.y.tolist()
        (torch.Size([4, 1, 28, 28]), [0, 3, 1, 3])
    """

    x: Tensor
    y: Tensor

    def to(self, *args, **kwargs) -> LabelledBatch:
        """Move both fields, like :meth:`torch.Tensor.to`."""
        return LabelledBatch(self.x.to(*args, **kwargs), self.y.to(*args, **kwargs))
