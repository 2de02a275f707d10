"""The few facts the library reads from a Lightning ``Trainer`` beyond its public attributes, in one place."""

from __future__ import annotations

from typing import Any, Optional


def gradient_scaler(trainer: Any) -> Optional[Any]:
    """The enabled ``torch.amp.GradScaler`` of a ``16-mixed`` run, else ``None``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
    return scaler if scaler is not None and scaler.is_enabled() else None


def precision(trainer: Any) -> str:
    """The run's precision flag (``"32-true"``, ``"16-mixed"``, ...); ``"32-true"`` without a trainer."""
    return str(trainer.precision) if trainer is not None else "32-true"


def batch_index(trainer: Any) -> int:
    """The index of the training batch in its epoch."""
    return trainer.fit_loop.epoch_loop.batch_idx if trainer is not None else 0


def batches_started(trainer: Any) -> int:
    """Training batches of the current epoch taken from the loader so far (what a checkpoint has consumed)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def take_over_compilation(module: Any) -> Optional[Any]:
    """When ``module`` was handed to the trainer as ``torch.compile(module)``, Lightning has wrapped its ``forward``
    and step methods with the compiler: undo that and return the compiler (``fn -> compiled fn``, the user's
    ``torch.compile`` settings), else ``None``."""
    ctx = getattr(module, "_compiler_ctx", None)
    if not ctx:
        return None
    from lightning.pytorch.utilities.compile import to_uncompiled

    to_uncompiled(module)
    return ctx["dynamo_ctx"]
