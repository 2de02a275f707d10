"""AdaptationCurve: how well a learner adapts, after each inner step and against the number of shots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union, cast

import lightning as L
import torch
from typing_extensions import override

from lightning_meta._checks import check_int
from lightning_meta.callbacks._images import figure_dir, new_figure, save_and_log
from lightning_meta.callbacks._tasks import ValidationTasks
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode


def _first_shots(t: torch.Tensor, n_way: int, k: int, s: int) -> torch.Tensor:
    """The first ``s`` of each class's ``k`` support examples (support is class-major): ``[B, N*k, ...] -> [B, N*s, ...]``."""
    return t.view(t.shape[0], n_way, k, *t.shape[2:])[:, :, :s].flatten(1, 2)


def _shot_ranks(batch: RaggedEpisode) -> torch.Tensor:
    """``[sum S_i]``: each support example's place among its task's examples of its class (0 for the first)."""
    cells = batch.task_index("support") * batch.num_ways + batch.support_y  # (task, class) of each row
    order = torch.argsort(cells, stable=True)  # rows grouped by cell, in their order within it
    counts = torch.bincount(cells, minlength=batch.num_tasks * batch.num_ways)
    places = torch.arange(len(cells), device=cells.device) - (torch.cumsum(counts, 0) - counts)[cells[order]]
    return torch.empty_like(places).scatter_(0, order, places)


def _ragged_first_shots(batch: RaggedEpisode, s: int) -> RaggedEpisode:
    """Each task with at most the first ``s`` support examples of each class (all of a class that has fewer)."""
    keep = _shot_ranks(batch) < s
    tasks = batch.task_index("support")[keep]
    sizes = tuple(torch.bincount(tasks, minlength=batch.num_tasks).tolist())
    return RaggedEpisode(batch.support_x[keep], batch.support_y[keep], batch.query_x, batch.query_y, sizes,
                         batch.query_sizes, batch.ways)


class AdaptationCurve(ValidationTasks):
    """After validation, measure a few validation episodes: query accuracy (MSE for regression) against the number of
    support shots 1..K for every learner, and after each inner step 0..S for MAML-family learners. The curves are
    saved as ``adaptation/epochNNN.png`` next to the logs, logged as the image ``val/adaptation_curve`` where the
    logger takes images, and kept in :attr:`history` (part of the callback's ``state_dict``, so a resumed run keeps
    the earlier epochs' curves; the plot shows every epoch so far). Variable-way, variable-shot episodes
    (:class:`~lightning_meta.data.RaggedEpisode`): shot ``s`` keeps at most the first ``s`` support examples of each
    class of each task (a class with fewer keeps all of them), up to the most any class has.

    Args:
        num_episodes: validation episodes measured.
        shots: support sizes per class to try (default ``1..K`` of the validation episodes).
        every_n_epochs: how often.

    Example:
        >>> cb = AdaptationCurve(num_episodes=4)
        >>> cb.state_dict()
        {'history': []}
    """

    def __init__(self, num_episodes: int = 16, shots: Optional[Sequence[int]] = None, every_n_epochs: int = 1) -> None:
        check_int("num_episodes", num_episodes, 1)
        check_int("every_n_epochs", every_n_epochs, 1)
        super().__init__()
        self.num_episodes, self.shots, self.every_n_epochs = num_episodes, shots, every_n_epochs
        self.history: list[dict[str, Any]] = []

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = self.collected(trainer)
        if batch is None:
            return
        regression = batch.is_regression
        n_way = 1 if regression else int(batch.support_y.max()) + 1
        k = int(_shot_ranks(batch).max()) + 1 if isinstance(batch, RaggedEpisode) else batch.support_y.shape[1] // n_way
        shots = [s for s in (self.shots or range(1, k + 1)) if 1 <= s <= k]
        learner = cast(Any, pl_module)  # a MetaLearner (its forward_episode takes ragged batches too)
        point: dict[str, Any] = {"epoch": trainer.current_epoch, "metric": "mse" if regression else "acc", "shots": [],
                                 "steps": []}
        was_training = pl_module.training
        pl_module.eval()
        for s in shots:
            sub: Union[Episode, RaggedEpisode] = _ragged_first_shots(batch, s) if isinstance(batch, RaggedEpisode) else \
                Episode(_first_shots(batch.support_x, n_way, k, s), _first_shots(batch.support_y, n_way, k, s),
                        batch.query_x, batch.query_y)
            point["shots"].append((s, self._score(learner.forward_episode(sub), sub)))
        step_outputs = getattr(pl_module, "step_outputs", None)
        if callable(step_outputs):
            outs = step_outputs(batch)  # [B, S+1, M, ...]
            point["steps"] = [(t, self._score(outs[:, t], batch)) for t in range(outs.shape[1])]  # ragged: padded
        pl_module.train(was_training)
        self.history.append(point)
        self._plot(trainer, point)

    @staticmethod
    def _score(outputs: torch.Tensor, batch: Union[Episode, RaggedEpisode]) -> float:
        if batch.is_regression:
            return float(batch.task_losses(outputs).mean())
        return float(batch.task_accuracies(outputs).mean())

    def _plot(self, trainer, point) -> None:
        panels = [("shots", "support examples per class")] + ([("steps", "inner steps")] if point["steps"] else [])
        fig = new_figure((5 * len(panels), 3.5))
        axes = fig.subplots(1, len(panels), squeeze=False)
        label = "query MSE" if point["metric"] == "mse" else "query accuracy"
        for ax, (name, xlabel) in zip(axes[0], panels):
            for past in self.history:
                if past[name]:
                    xs, ys = zip(*past[name])
                    latest = past is point
                    ax.plot(xs, ys, marker="o", alpha=1.0 if latest else 0.3, label=f"epoch {past['epoch']}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        path = figure_dir(trainer, "adaptation") / f"epoch{point['epoch']:03d}.png"
        save_and_log(trainer, fig, path, "val/adaptation_curve")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
