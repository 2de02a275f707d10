"""Episode metrics: the mean over episodes and its 95% confidence half-width, exact under DDP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, cast

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_meta.functional.episode import episode_accuracy, per_task_loss


class EpisodeMean(Metric):
    """Mean of a per-episode value with its 95% confidence half-width ``1.96 * std / sqrt(n)`` (sample std).

    States are float64 sums (``dist_reduce_fx="sum"``), so the result over ranks equals the result of one process
    on the same episodes. ``compute()`` returns ``(mean, ci95)``.

    Example:
        >>> m = EpisodeMean()
        >>> m.update(torch.tensor([0.5, 1.0, 0.75]))
        >>> mean, ci95 = m.compute()
        >>> round(mean.item(), 4), round(ci95.item(), 4)
        (0.75, 0.2829)
    """

    is_differentiable = False
    higher_is_better: Optional[bool] = None
    full_state_update = False
    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> EpisodeMean:
        # sums stay float64 whatever the module's precision: `precision="bf16-true"` converts the whole LightningModule,
        # metric states included, and bfloat16 counts integers exactly only up to 256
        this = cast(EpisodeMean, super()._apply(fn, exclude_state))
        for key in ("total", "total_sq"):
            this._defaults[key] = cast(Tensor, this._defaults[key]).to(torch.float64)
            setattr(this, key, getattr(this, key).to(torch.float64))
        return this

    def update(self, values: Tensor) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        self.total += values.sum()
        self.total_sq += values.pow(2).sum()
        self.count += values.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        n = self.count.to(torch.float64)
        mean = self.total / n.clamp_min(1)
        var = ((self.total_sq - n * mean.pow(2)) / (n - 1).clamp_min(1)).clamp_min(0)
        ci95 = torch.where(n > 1, 1.96 * var.sqrt() / n.sqrt(), torch.zeros_like(var))
        return mean.float(), ci95.float()


class EpisodeCount(Metric):
    """How many episodes were flagged (e.g. diverged), summed over updates and ranks (an int64 state).

    Example:
        >>> c = EpisodeCount()
        >>> c.update(torch.tensor([True, False, True]))
        >>> c.compute().item()
        2
    """

    is_differentiable = False
    full_state_update = False
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, flags: Tensor) -> None:
        self.count += flags.detach().reshape(-1).long().sum().to(self.count.device)

    def compute(self) -> Tensor:
        return self.count.clone()


class EpisodeAccuracy(EpisodeMean):
    """Query accuracy per episode, averaged over episodes, with its 95% interval.

    ``update(logits, labels)`` takes a meta-batch ``[B, M, N]`` / ``[B, M]`` (or one task ``[M, N]`` / ``[M]``).

    Example:
        >>> acc = EpisodeAccuracy()
        >>> acc.update(torch.tensor([[[2., 1.], [0., 3.]], [[1., 0.], [1., 0.]]]), torch.tensor([[0, 1], [0, 1]]))
        >>> [round(v.item(), 4) for v in acc.compute()]
        [0.75, 0.49]
    """

    higher_is_better = True

    def update(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"Expected logits of shape [..., M, N] and labels [..., M], but got {tuple(logits.shape)} and "
                f"{tuple(labels.shape)}."
            )
        super().update(episode_accuracy(logits, labels))


class EpisodeMSE(EpisodeMean):
    """Query mean squared error per regression episode, averaged over episodes, with its 95% interval.

    Example:
        >>> mse = EpisodeMSE()
        >>> mse.update(torch.tensor([[1., 2.], [0., 0.]]), torch.tensor([[1., 4.], [1., 1.]]))
        >>> [round(v.item(), 3) for v in mse.compute()]
        [1.5, 0.98]
    """

    higher_is_better = False

    def update(self, predictions: Tensor, targets: Tensor, target_ndim: int = 0) -> None:  # type: ignore[override]
        """Predictions and targets ``[B, M]`` (or one task ``[M]``; ``[.., M, D]`` with ``target_ndim=1``)."""
        super().update(per_task_loss(predictions, targets, target_ndim))


__all__ = ["EpisodeAccuracy", "EpisodeCount", "EpisodeMSE", "EpisodeMean"]
