"""The shared part of callbacks that look at a few validation episodes after each validation epoch."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode


class ValidationTasks(L.Callback):
    """Keeps the first ``num_episodes`` validation tasks of each epoch (those :meth:`keeps` accepts) and hands them
    back as one meta-batch on the epochs the subclass acts on: a batched :class:`Episode` when the tasks share one
    shape, else a :class:`~lightning_meta.data.RaggedEpisode` (variable-way, variable-shot validation episodes).
    Subclasses set ``num_episodes`` and ``every_n_epochs``."""

    num_episodes: int
    every_n_epochs: int

    def __init__(self) -> None:
        self._tasks: list[Episode] = []

    def keeps(self, batch: Union[Episode, RaggedEpisode]) -> bool:
        """Whether this validation batch's tasks are of a kind the callback can use."""
        return True

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tasks = []

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if len(self._tasks) >= self.num_episodes:
            return
        prepare = getattr(pl_module, "prepare_episode", None)
        if callable(prepare):  # uint8 images as the learner sees them
            batch = prepare(batch)
        elif not isinstance(batch, RaggedEpisode):
            batch = Episode(*batch)
        if not self.keeps(batch):
            return
        for i in range(batch.num_tasks):
            if len(self._tasks) < self.num_episodes:
                self._tasks.append(Episode(*(t.detach().clone() for t in batch.task(i))))

    def collected(self, trainer) -> Optional[Union[Episode, RaggedEpisode]]:
        """The kept tasks as one meta-batch, or ``None`` where nothing is due: a sanity check, an epoch between
        ``every_n_epochs``, no tasks kept, or a rank other than zero."""
        if trainer.sanity_checking or not self._tasks or trainer.current_epoch % self.every_n_epochs:
            return None
        if not trainer.is_global_zero:
            return None
        def kind(task: Episode) -> tuple:  # shapes and, for classes, ways: a 2-way and a 3-way task never stack
            ways = None if task.support_y.is_floating_point() else int(task.support_y.max())
            return (*(t.shape for t in task), ways)

        if len({kind(task) for task in self._tasks}) > 1:  # tasks of different shapes
            return RaggedEpisode.from_tasks(self._tasks)
        return Episode(*(torch.stack(f) for f in zip(*self._tasks)))


def example_shape(batch: Union[Episode, RaggedEpisode]) -> tuple[int, ...]:
    """The shape of one input example of a meta-batch (``[C, H, W]`` for images)."""
    return tuple(batch.support_x.shape[1 if isinstance(batch, RaggedEpisode) else 2 :])


def task_outputs(batch: Union[Episode, RaggedEpisode], outputs: Tensor) -> list[Tensor]:
    """Each task's own outputs ``[M_i, N_i]`` of a meta-batch's ``[B, M(_max), N(_max)]``."""
    return batch.unpad_outputs(outputs) if isinstance(batch, RaggedEpisode) else list(outputs)
