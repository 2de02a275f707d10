"""The few facts the library reads from a Lightning ``Trainer`` beyond its public attributes, in one place."""

from __future__ import annotations

import math
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


def swa_updates_only_running_statistics(trainer: Any) -> None:
    """Lightning's ``StochasticWeightAveraging`` adds an epoch that recomputes batch norm's running statistics for the
    averaged weights, and asserts that every batch norm has them. A batch norm without running statistics (the MAML
    family's: every task normalises with its own support statistics) has nothing to recompute: the callback's
    batch-norm test is narrowed to batch norms that keep running statistics, so it averages the weights and adds no
    epoch for such a model."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from torch import nn

    def keeps_running_statistics(pl_module: Any) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                   for m in pl_module.modules())

    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, StochasticWeightAveraging):
            callback.pl_module_contains_batch_norm = keeps_running_statistics  # type: ignore[method-assign]


def total_training_steps(trainer: Any) -> int:
    """Optimizer steps of the whole run: arithmetic for a data module that knows its ``steps_per_epoch`` (an
    EpisodicDataModule), else Lightning's ``estimated_stepping_batches``."""
    per_epoch = getattr(getattr(trainer, "datamodule", None), "steps_per_epoch", None)
    if per_epoch is None or trainer.max_epochs is None or trainer.max_epochs < 0:
        return int(trainer.estimated_stepping_batches)
    batches = per_epoch()
    limit = trainer.limit_train_batches
    batches = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
    total = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
    return min(total, trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else total


def accumulating(trainer: Any) -> bool:
    """Whether the current training batch only accumulates gradients (no optimizer step after it)."""
    return trainer is not None and bool(trainer.fit_loop.epoch_loop._should_accumulate())


def evaluation_set_names(trainer: Any, stage: str) -> Optional[list[str]]:
    """The names of the evaluation sets of ``stage`` (``"val"``/``"test"``) when its loaders are a dict of named
    loaders (``EpisodicDataModule(test={"cub": ..., ...})``), in ``dataloader_idx`` order; ``None`` otherwise."""
    if trainer is None:
        return None
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    return [str(name) for name in loaders] if isinstance(loaders, dict) else None


def last_evaluation_batch(trainer: Any, dataloader_idx: int, batch_idx: int) -> bool:
    """Whether batch ``batch_idx`` is the last the running validation or test loop takes from loader
    ``dataloader_idx`` (its length on this rank, after ``limit_*_batches`` and sanity-check steps); ``False`` for a
    loader of unknown length."""
    try:  # the property names the loop of the running fit, validate or test, and raises outside them
        batches = trainer._evaluation_loop.max_batches
    except (AttributeError, RuntimeError):
        return False
    return dataloader_idx < len(batches) and batches[dataloader_idx] == batch_idx + 1


def predict_loaders(trainer: Any) -> list[Any]:
    """The loaders of the running predict loop (one, a list or a dict of them) in ``dataloader_idx`` order."""
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def known_batch_indices(trainer: Any, loaders: list[Any]) -> None:
    """Lightning warns that it "Couldn't infer the batch indices" of a predict loader without a batch sampler (an
    episode stream's); where the prediction writer knows them (``loaders``), that warning is not given, for loader
    types that no other predict loader has."""
    cache: set[str] = getattr(getattr(trainer, "predict_loop", None), "_warning_cache", set())  # a WarningCache
    others = {type(loader).__name__ for loader in predict_loaders(trainer) if all(loader is not k for k in loaders)}
    for name in {type(loader).__name__ for loader in loaders} - others:
        cache.add(f"Couldn't infer the batch indices fetched from your dataloader: `{name}`")
