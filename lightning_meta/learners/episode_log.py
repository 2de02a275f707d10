"""What a learner logs: per training step the meta-loss and accuracy (or MSE); per evaluation epoch and evaluation
set the mean loss, the mean accuracy (or MSE) with its 95% interval over episodes, and the count of diverged tasks
(non-finite outputs), which are counted rather than averaged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_meta import trainer_view
from lightning_meta.data.episode import Episode
from lightning_meta.functional.episode import episode_accuracy, per_task_loss, target_ndim
from lightning_meta.metrics import EpisodeCount, EpisodeMean

if TYPE_CHECKING:
    from lightning_meta.learners.base import MetaLearner

STAGES = ("train", "val", "test")


class EpisodeLog(nn.Module):
    """The episode metrics of each stage and evaluation set (a submodule of the learner, so they move with it and
    reduce across DDP ranks), and the calls that log them through the learner.

    Example:
        >>> log = EpisodeLog()
        >>> values, losses, diverged = log.stream("test", 0)
        >>> type(values).__name__, type(diverged).__name__
        ('EpisodeMean', 'EpisodeCount')
    """

    def __init__(self) -> None:
        super().__init__()
        # ModuleDict keys may not shadow Module methods such as `train`
        self.values = nn.ModuleDict({f"{stage}_value": EpisodeMean() for stage in STAGES})
        self.losses = nn.ModuleDict({f"{stage}_loss": EpisodeMean() for stage in STAGES})
        self.diverged = nn.ModuleDict({f"{stage}_diverged": EpisodeCount() for stage in STAGES})
        self.regression: Optional[bool] = None

    def stream(self, stage: str, index: int) -> tuple[EpisodeMean, EpisodeMean, EpisodeCount]:
        """The value, loss and divergence metrics of evaluation stream ``index`` of ``stage`` (one per named set; the
        first set's are built with the learner, the others on first use, on the learner's device)."""
        key = stage if index == 0 else f"{stage}{index}"
        if f"{key}_value" not in self.values:
            device = cast(EpisodeMean, self.values[f"{stage}_value"]).device
            self.values[f"{key}_value"] = EpisodeMean().to(device)
            self.losses[f"{key}_loss"] = EpisodeMean().to(device)
            self.diverged[f"{key}_diverged"] = EpisodeCount().to(device)
        return (cast(EpisodeMean, self.values[f"{key}_value"]), cast(EpisodeMean, self.losses[f"{key}_loss"]),
                cast(EpisodeCount, self.diverged[f"{key}_diverged"]))

    def step(self, learner: MetaLearner, batch: Episode, outputs: Tensor, stage: str, loss: Optional[Tensor] = None,
             dataloader_idx: int = 0) -> None:
        """Log a training step (``loss``: its meta-loss) or add an evaluation meta-batch to its stream's metrics."""
        regression = batch.is_regression
        self.regression = regression
        if stage == "train" and learner._trainer is None:
            return  # a bare training_step call (tests, notebooks, benchmarks) has nowhere to log
        per_task = per_task_loss(outputs, batch.query_y, target_ndim(batch.query_y, 1))
        value = per_task if regression else episode_accuracy(outputs, batch.query_y)
        if stage != "train":  # a diverged task (NaN outputs, e.g. MAML's inner loop) is counted, not averaged
            ok = torch.isfinite(outputs.flatten(1).float()).all(1)
            values, losses, diverged = self.stream(stage, dataloader_idx)
            diverged.update(~ok)
            values.update(value[ok])
            losses.update(per_task[ok])
        elif loss is not None:
            b = batch.num_tasks
            learner.log("train/loss", loss, prog_bar=True, batch_size=b)
            learner.log(f"train/{'mse' if regression else 'acc'}", value.mean(), prog_bar=True, batch_size=b)

    def epoch(self, learner: MetaLearner, stage: str) -> None:
        """Log an evaluation epoch's figures per evaluation set (``val/acc``, or ``test/<name>/acc`` for named sets)
        and reset its metrics."""
        names = trainer_view.evaluation_set_names(learner._trainer, stage)  # named sets: {"cub": loader, ...}
        for index in range(len(names) if names else 1):
            prefix = f"{stage}/{names[index]}" if names else stage
            values, losses, diverged_count = self.stream(stage, index)
            if values.update_count == 0 and self.regression is None:
                continue
            name = "mse" if self.regression else "acc"
            mean, ci95 = values.compute()
            loss, _ = losses.compute()
            diverged = diverged_count.compute()
            learner.log_dict({f"{prefix}/loss": loss, f"{prefix}/{name}": mean, f"{prefix}/{name}_ci95": ci95},
                             prog_bar=stage == "val")
            learner.log(f"{prefix}/diverged", diverged.float())
            if diverged > 0:
                rank_zero_warn(f"{int(diverged)} {prefix} tasks diverged (non-finite outputs) and are left out of "
                               f"{prefix}/{name}, which averages the other tasks; lower the inner learning rate.")
            for metric in (values, losses, diverged_count):
                metric.reset()
