"""The non-finite policy: what a training step does with a NaN or infinite meta-loss (``nonfinite="raise"`` stops
naming the step; ``"skip"`` skips the meta-batch), taken by all DDP ranks together so none waits in a gradient
all-reduce another rank skipped, and leaving the optimizer, the accumulated gradients and a gradient scaler as if the
skipped meta-batch had never been drawn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_meta import trainer_view

if TYPE_CHECKING:
    from lightning_meta.learners.base import MetaLearner


@dataclass
class _Skip:
    """A training step skipped under DDP: whether it ends an accumulation window (an optimizer step follows), and the
    parameters that had no gradient just before its backward."""

    ends_window: bool
    without_gradient: list[Tensor] = field(default_factory=list)


class NonFinitePolicy:
    """Applies a learner's ``nonfinite`` option; the learner's training step and backward hooks call into it.

    Example (one process: a skipped step returns ``None``, so Lightning runs no backward for it):
        >>> from lightning_meta import ProtoNet
        >>> learner = ProtoNet(torch.nn.Flatten(), nonfinite="skip")
        >>> NonFinitePolicy().review(learner, torch.tensor(float("nan"))) is None
        True
    """

    def __init__(self) -> None:
        self._skip: Optional[_Skip] = None  # a step skipped under DDP, for after_backward
        self._scaler_state: Optional[dict] = None  # the gradient scaler before a skipped step, restored after it

    def review(self, learner: MetaLearner, loss: Tensor) -> Optional[Tensor]:
        """``loss`` when it is finite on every process; otherwise raise (``"raise"``) or return what a skipped step
        returns (``"skip"``, after a warning)."""
        trainer = learner._trainer
        finite = bool(torch.isfinite(loss))
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return loss
        step = trainer.global_step if trainer is not None else 0
        where = f"is {loss.item()}" if not torch.isfinite(loss) else "is finite here but not on another process"
        if learner.hparams["nonfinite"] == "skip":
            rank_zero_warn(f"Skipped meta-batch at global step {step}: the meta-loss {where}.")
            return self._skipped_loss(learner)
        raise FloatingPointError(
            f"The meta-loss {where} at global step {step} (epoch {learner.current_epoch}, batch "
            f"{trainer_view.batch_index(trainer)}). Training stopped before the model was updated. Lower "
            "the learning rates, check the inputs for NaNs, or pass nonfinite='skip' to skip such meta-batches."
        )

    def _skipped_loss(self, learner: MetaLearner) -> Optional[Tensor]:
        """What a skipped training step returns: ``None`` in one process, where Lightning then runs no backward: the
        meta-batch adds nothing to the gradients, and where it ends an accumulation window the optimizer still steps
        on what the window's other meta-batches gave (under a gradient scaler, Lightning skips that step and the
        scaler's update instead). Under DDP every rank must join the gradient all-reduce (Lightning refuses ``None``
        there), so all ranks return a zero loss of every trainable parameter, whose gradient adds exactly nothing, and
        :meth:`after_backward` makes the rest equal to one process: gradients that this backward created are taken
        away again, and under a scaler at the end of a window the step is skipped (NaN gradients) and the scaler's
        state restored (:meth:`after_batch`)."""
        trainer = learner._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        self._skip = _Skip(ends_window=not trainer_view.accumulating(trainer))
        return cast(Tensor, sum(p.sum() for p in learner.parameters() if p.requires_grad)) * 0.0

    def before_backward(self, learner: MetaLearner) -> None:
        """Note the parameters without a gradient (after Lightning's zero_grad, which runs after the training step)."""
        if self._skip is not None:
            self._skip.without_gradient = [p for p in learner.parameters() if p.requires_grad and p.grad is None]

    def after_backward(self, learner: MetaLearner) -> None:
        """Undo what a skipped step's backward did that one process would not have done."""
        skip, self._skip = self._skip, None
        if skip is None:
            return
        for p in skip.without_gradient:  # zeros from the skipped meta-batch's backward: as if it had none
            p.grad = None
        scaler = trainer_view.gradient_scaler(learner._trainer)
        if scaler is not None and skip.ends_window:  # one process: no optimizer step, no scaler update
            self._scaler_state = scaler.state_dict()
            for p in learner.parameters():
                if p.grad is not None:
                    p.grad = torch.full_like(p.grad, float("nan"))

    def after_batch(self, learner: MetaLearner) -> None:
        """Restore the scaler after a skipped step: its scale and growth are as before it."""
        if self._scaler_state is None:  # every training batch comes here: nothing to look up unless a step was skipped
            return
        scaler = trainer_view.gradient_scaler(learner._trainer)
        if scaler is not None:
            scaler.load_state_dict(self._scaler_state)
        self._scaler_state = None
