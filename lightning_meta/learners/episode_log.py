"""What a learner logs: per training step the meta-loss and accuracy (or MSE); per evaluation epoch and evaluation
set the mean loss, the mean accuracy (or MSE) with its 95% interval over episodes, and the count of diverged tasks
(non-finite outputs), which are counted rather than averaged.

Named evaluation sets (``val={"a": A, "b": B}``) log each set's figures under its own name (``val/a/acc``, ...) and,
beside them, the figures over the sets under the stage's own names, which callbacks monitor (``val/acc``): the mean of
the sets' accuracies (or MSEs) and losses, each set weighing the same whatever its number of episodes; the sum of their
diverged tasks; and as ``val/acc_ci95`` the 95% interval of that mean of independent set means,
``sqrt(sum_i ci95_i ** 2) / n_sets``. A set's figures are logged when its loader ends, in that loader's context, so
``trainer.validate``/``trainer.test`` return (and print) each set's figures in its own loader's dict only; the figures
over the sets are logged once, at the epoch's end, outside any loader, so Lightning puts them in every loader's dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_meta import trainer_view
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode
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
        self.finished: dict[tuple[str, int], dict[str, Tensor]] = {}  # (stage, set index) -> its logged figures

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

    def step(self, learner: MetaLearner, batch: Union[Episode, RaggedEpisode], outputs: Tensor, stage: str,
             loss: Optional[Tensor] = None, dataloader_idx: int = 0, batch_idx: Optional[int] = None) -> None:
        """Log a training step (``loss``: its meta-loss) or add an evaluation meta-batch to its stream's metrics; the
        last batch (``batch_idx``) of a named set's loader logs that set's figures."""
        regression = batch.is_regression
        self.regression = regression
        if stage == "train" and learner._trainer is None:
            return  # a bare training_step call (tests, notebooks, benchmarks) has nowhere to log
        per_task = batch.task_losses(outputs)  # [B]; a RaggedEpisode reads each task's own queries and classes
        value = per_task if regression else batch.task_accuracies(outputs)
        if stage != "train":  # a diverged task (NaN outputs, e.g. MAML's inner loop) is counted, not averaged
            ok = batch.task_finite(outputs)
            values, losses, diverged = self.stream(stage, dataloader_idx)
            diverged.update(~ok)
            values.update(value[ok])
            losses.update(per_task[ok])
            names = trainer_view.evaluation_set_names(learner._trainer, stage)
            if names and batch_idx is not None and trainer_view.last_evaluation_batch(learner._trainer, dataloader_idx,
                                                                                      batch_idx):
                self.finish(learner, stage, dataloader_idx, f"{stage}/{names[dataloader_idx]}")  # in its loader
        elif loss is not None:
            b = batch.num_tasks
            learner.log("train/loss", loss, prog_bar=True, batch_size=b)
            learner.log(f"train/{'mse' if regression else 'acc'}", value.mean(), prog_bar=True, batch_size=b)

    def finish(self, learner: MetaLearner, stage: str, index: int, prefix: str) -> None:
        """Log the figures of evaluation stream ``index`` of ``stage`` as ``<prefix>/acc``, ... (``prefix``: ``val``, or
        ``val/<name>`` for a named set), keep them for the figures over the sets, and reset its metrics."""
        values, losses, diverged_count = self.stream(stage, index)
        if values.update_count == 0 and self.regression is None:
            return
        name = "mse" if self.regression else "acc"
        mean, ci95 = values.compute()  # under DDP: over every rank's episodes
        loss, _ = losses.compute()
        diverged = diverged_count.compute().float()
        figures = {f"{prefix}/loss": loss, f"{prefix}/{name}": mean, f"{prefix}/{name}_ci95": ci95}
        # a named set's figures belong to the loader being run (none at the epoch's end: then every loader's dict)
        learner.log_dict(figures, prog_bar=stage == "val", add_dataloader_idx=False, batch_size=1)
        learner.log(f"{prefix}/diverged", diverged, add_dataloader_idx=False, batch_size=1)
        self.finished[(stage, index)] = {"loss": loss, name: mean, f"{name}_ci95": ci95, "diverged": diverged}
        if diverged > 0:
            rank_zero_warn(f"{int(diverged)} {prefix} tasks diverged (non-finite outputs) and are left out of "
                           f"{prefix}/{name}, which averages the other tasks; lower the inner learning rate.")
        for metric in (values, losses, diverged_count):
            metric.reset()

    def epoch(self, learner: MetaLearner, stage: str) -> None:
        """Log an evaluation epoch's figures (``val/acc``; with named sets each set's not logged yet, and the figures
        over the sets, see the module's docstring) and reset its metrics."""
        names = trainer_view.evaluation_set_names(learner._trainer, stage)  # named sets: {"cub": loader, ...}
        for index in range(len(names) if names else 1):
            if (stage, index) not in self.finished:  # a loader of unknown length ends unnoticed: logged here
                self.finish(learner, stage, index, f"{stage}/{names[index]}" if names else stage)
        sets = [self.finished.pop((stage, index)) for index in range(len(names) if names else 1)
                if (stage, index) in self.finished]
        if names and sets:
            name = "mse" if self.regression else "acc"
            over: dict[str, Tensor] = {
                f"{stage}/loss": torch.stack([s["loss"] for s in sets]).mean(),
                f"{stage}/{name}": torch.stack([s[name] for s in sets]).mean(),
                # the 95% interval of a mean of independent means: sqrt(sum of squared intervals) / number of sets
                f"{stage}/{name}_ci95": torch.stack([s[f"{name}_ci95"] for s in sets]).square().sum().sqrt() / len(sets),
            }
            learner.log_dict(over, prog_bar=stage == "val")
            learner.log(f"{stage}/diverged", torch.stack([s["diverged"] for s in sets]).sum())
