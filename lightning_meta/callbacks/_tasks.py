"""The shared part of callbacks that look at a few validation episodes after each validation epoch."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from typing_extensions import override

from lightning_meta.data.episode import Episode


class ValidationTasks(L.Callback):
    """Keeps the first ``num_episodes`` validation tasks of each epoch (those :meth:`keeps` accepts) and hands them
    back stacked as one meta-batch on the epochs the subclass acts on. Subclasses set ``num_episodes`` and
    ``every_n_epochs``."""

    num_episodes: int
    every_n_epochs: int

    def __init__(self) -> None:
        self._tasks: list[Episode] = []

    def keeps(self, batch: Episode) -> bool:
        """Whether this validation batch's tasks are of a kind the callback can use."""
        return True

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tasks = []

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        prepare = getattr(pl_module, "prepare_episode", None)
        batch = prepare(batch) if callable(prepare) else Episode(*batch)  # uint8 images as the learner sees them
        if not self.keeps(batch):
            return
        for i in range(batch.num_tasks):
            if len(self._tasks) < self.num_episodes:
                self._tasks.append(Episode(*(t[i].detach().clone() for t in batch)))

    def collected(self, trainer) -> Optional[Episode]:
        """The kept tasks as one meta-batch, or ``None`` where nothing is due: a sanity check, an epoch between
        ``every_n_epochs``, no tasks kept, or a rank other than zero."""
        if trainer.sanity_checking or not self._tasks or trainer.current_epoch % self.every_n_epochs:
            return None
        if not trainer.is_global_zero:
            return None
        return Episode(*(torch.stack(f) for f in zip(*self._tasks)))
