"""MetaLearner: the LightningModule base every learner shares."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta import trainer_view
from lightning_meta._checks import check_choice, check_positive, surely_finite
from lightning_meta.checkpoint import CheckedCheckpointIO, read_checkpoint, rng_states, set_rng_states
from lightning_meta.compile import CompiledFunction, Compiler, make_compiler, unwrap_compiled
from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.functional.episode import episode_accuracy, per_task_loss, target_ndim
from lightning_meta.metrics import EpisodeCount, EpisodeMean
from lightning_meta.models import backbone_spec, build_backbone

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = (None, "cosine", "step")
STAGES = ("train", "val", "test")


class TaskPredictor:
    """What :meth:`MetaLearner.adapt` returns: call it on query inputs ``[M, ...]`` to get logits ``[M, N]`` (or
    predictions ``[M, ...]`` for regression). Runs without gradients, in the learner's evaluation mode.

    Example:
        >>> from lightning_meta import ProtoNet
        >>> predictor = ProtoNet(nn.Identity()).adapt(torch.tensor([[0.0], [10.0]]), torch.tensor([0, 1]))
        >>> predictor.n_way, predictor(torch.tensor([[1.0], [9.0]])).argmax(-1).tolist()
        (2, [0, 1])
    """

    def __init__(self, predict: Callable[[Tensor], Tensor], n_way: int) -> None:
        self._predict, self.n_way = predict, n_way

    def __call__(self, query_x: Tensor) -> Tensor:
        return self._predict(query_x)


@dataclass
class _Skip:
    """A training step skipped under DDP: whether it ends an accumulation window (an optimizer step follows), and the
    parameters that had no gradient just before its backward."""

    ends_window: bool
    without_gradient: list[Tensor] = field(default_factory=list)


class MetaLearner(L.LightningModule):
    """Shared episode steps, metrics, logging and optimizers; subclasses implement :meth:`forward_episode` (a batch of
    tasks to query outputs) and :meth:`adapt` (one task to a predictor).

    Args:
        lr: outer-loop learning rate.
        weight_decay: outer-loop weight decay.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        lr_scheduler: ``None``, ``"cosine"`` (per step, over the whole run) or ``"step"`` (x ``lr_gamma`` every
            ``lr_step_epochs`` epochs).
        nonfinite: what to do when a training meta-loss is NaN or infinite: ``"raise"`` stops with an error naming the
            step; ``"skip"`` warns and skips the meta-batch (no update).
        compile: compile the learner's cores with ``torch.compile`` (MAML: the whole inner loop and query pass of a
            task or vmapped chunk; ProtoNet, AttentionLearner: the meta-batch's forward): ``True``, or a dict of
            ``torch.compile`` arguments (``{"mode": "reduce-overhead"}``). ``trainer.fit(torch.compile(learner))``
            and a ``torch.compile``-d backbone do the same with their settings. A core that fails to compile or
            changes the numbers runs eagerly after one warning (:mod:`lightning_meta.compile`).

    Logged: ``train/loss`` and ``train/acc`` (or ``train/mse``); ``val/loss``, ``val/acc`` and ``val/acc_ci95``
    (classification) or ``val/mse`` and ``val/mse_ci95`` (regression); likewise ``test/*``.

    Example (a new learner implements two methods; nearest support example, no training):
        >>> from lightning_meta import Episode
        >>> class Nearest(MetaLearner):
        ...     def forward_episode(self, batch):
        ...         d = torch.cdist(batch.query_x, batch.support_x)              # [B, M, S]
        ...         onehot = nn.functional.one_hot(batch.support_y).float()     # [B, S, N]
        ...         return -torch.einsum("bms,bsn->bmn", d, onehot) + self.dummy * 0
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.dummy = nn.Parameter(torch.zeros(()))
        >>> ep = Episode(torch.tensor([[[0.0], [5.0]]]), torch.tensor([[0, 1]]), torch.tensor([[[4.0]]]), torch.tensor([[1]]))
        >>> Nearest()(ep).argmax(-1).tolist()
        [[1]]
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        lr_scheduler: Optional[str] = None,
        lr_step_epochs: int = 10,
        lr_gamma: float = 0.5,
        nonfinite: str = "raise",
        compile: Any = False,  # noqa: A002 -- the name users know from torch.compile
    ) -> None:
        super().__init__()
        check_positive("lr", lr)
        check_choice("optimizer", optimizer, sorted(OPTIMIZERS))
        check_choice("lr_scheduler", lr_scheduler, SCHEDULERS)
        check_choice("nonfinite", nonfinite, ("raise", "skip"))
        self._compiler: Optional[Compiler] = make_compiler(compile)
        self._compiled: dict[str, CompiledFunction] = {}
        # every option of the learner, its subclass's included (Lightning collects the arguments of each __init__ in
        # the chain), stored once; the modules passed in are not hyperparameters
        self.save_hyperparameters(ignore=["backbone"])
        # per-stage episode metrics (ModuleDict keys may not shadow Module methods such as `train`)
        self.metrics = nn.ModuleDict({f"{stage}_value": EpisodeMean() for stage in STAGES})
        self.losses = nn.ModuleDict({f"{stage}_loss": EpisodeMean() for stage in STAGES})
        self.diverged = nn.ModuleDict({f"{stage}_diverged": EpisodeCount() for stage in STAGES})
        self._regression: Optional[bool] = None
        self._pending_rng: Optional[dict] = None
        self._skip: Optional[_Skip] = None  # a step skipped under DDP, for on_after_backward
        self._scaler_state: Optional[dict] = None  # the gradient scaler before a skipped step, restored after it

    # ------------------------------------------------------------------ what subclasses implement
    def forward_episode(self, batch: Episode) -> Tensor:
        """Query outputs ``[B, M, N]`` (logits) or ``[B, M]`` (regression) for a meta-batch of tasks."""
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        """Adapt to one new task (no batch dimension) and return a predictor for its queries."""
        raise NotImplementedError

    def meta_loss(self, batch: Episode, outputs: Tensor) -> Tensor:
        """The loss the outer loop minimises (default: mean query loss over the tasks)."""
        return per_task_loss(outputs, batch.query_y, target_ndim(batch.query_y, 1)).mean()

    def check_episode(self, batch: Episode) -> int:
        """Validate a meta-batch before any work; returns its number of ways (1 for regression)."""
        return check_episode(batch)

    def as_inputs(self, x: Tensor, name: str = "inputs") -> Tensor:
        """Inputs on the learner's device in the dtype of its weights: other float dtypes are cast (float64 data in a
        float32 model), and ``uint8`` images (what image datasets put in episodes, a quarter of float32's bytes) are
        moved first and converted there to floats in [0, 1] (``x / 255``, computed in float32)."""
        x = torch.as_tensor(x)
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        device = weight.device if weight is not None else x.device
        if x.dtype == torch.uint8:
            x = x.to(device, non_blocking=True).to(torch.float32).div_(255)
        if weight is None:
            return x
        return x.to(device=device, dtype=weight.dtype if x.is_floating_point() else x.dtype)

    def prepare_episode(self, batch: Any) -> Episode:
        """A meta-batch in the form the learners compute on: integer labels of any width as int64 (bool labels are
        refused), inputs as floats in the weights' dtype (:meth:`as_inputs`). Raises for anything but a 4-tuple."""
        if not isinstance(batch, tuple) or len(batch) != 4:
            raise TypeError(
                f"Expected an Episode(support_x, support_y, query_x, query_y) meta-batch, but got "
                f"{type(batch).__name__}. For one task, use `learner.adapt(support_x, support_y)(query_x)`."
                + (" Labelled (x, y) batches (EpisodicDataModule(pretrain_batch_size=...)) train a Pretrainer."
                   if isinstance(batch, LabelledBatch) else "")
            )
        sx, sy, qx, qy = batch
        return Episode(self.as_inputs(sx, "support_x"), as_targets(sy, "support_y"), self.as_inputs(qx, "query_x"),
                       as_targets(qy, "query_y"))

    # ------------------------------------------------------------------ compilation
    @property
    def compiler(self) -> Optional[Compiler]:
        """What compiles the learner's cores (``fn -> compiled fn``), or ``None`` when it runs eagerly."""
        return self._compiler

    def use_compiler(self, compiler: Optional[Compiler]) -> None:
        """Compile the cores with ``compiler`` from now on (``None``: eager); cores compiled with another compiler
        before are dropped (the same one keeps them: ``trainer.test(torch.compile(learner))`` after ``fit``)."""
        if compiler is not self._compiler:
            self._compiler, self._compiled = compiler, {}

    def plain_backbone(self, backbone: nn.Module) -> nn.Module:
        """``backbone`` itself, or for ``torch.compile(backbone)`` the module it wraps, the learner then compiling its
        cores with the same settings (unless ``compile`` chose its own): parameter names and checkpoints stay plain."""
        plain, compiler = unwrap_compiled(backbone)
        if compiler is not None and self._compiler is None:
            self.use_compiler(compiler)
        return plain

    def compiled(self, name: str, fn: Callable) -> Callable:
        """``fn`` compiled (a :class:`~lightning_meta.compile.CompiledFunction`, made once per ``name``) when the
        learner compiles, else ``fn``. ``fn`` must be a pure tensor function of its arguments and the parameters."""
        if self._compiler is None:
            return fn
        if name not in self._compiled:
            self._compiled[name] = CompiledFunction(fn, self._compiler, f"{type(self).__name__}'s compiled {name}", self)
        return self._compiled[name]

    def compiled_cores(self) -> list[str]:
        """The names of the cores made so far for compilation (compiled, or run eagerly after a fallback)."""
        return list(self._compiled)

    def compiled_fallbacks(self) -> dict[str, str]:
        """The cores that fell back to eager, with the reason (empty when all compiled cores run compiled)."""
        return {name: f.reason for name, f in self._compiled.items() if f.eager and f.reason}

    def __getstate__(self) -> dict:  # compiled functions are rebuilt on use, not pickled or deep-copied
        return {**super().__getstate__(), "_compiled": {}}

    @torch.compiler.disable
    def _forward_compiled_by_caller(self, batch: Episode) -> Tensor:
        if self._compiler is None:
            rank_zero_info(f"torch.compile({type(self).__name__}) was called: the learner compiles its cores "
                           "(MAML: the inner loop; see lightning_meta.compile) with torch.compile's defaults and runs "
                           "its checks eagerly. For other settings pass compile={...} to the learner.")
            self.use_compiler(make_compiler(True))
        return self.forward(batch)

    # ------------------------------------------------------------------ steps
    @override
    def forward(self, batch: Episode) -> Tensor:
        """Query outputs of a meta-batch (see :meth:`forward_episode`), after the same checks as a training step."""
        if torch.compiler.is_compiling():  # called through torch.compile(learner): compile the cores instead
            return self._forward_compiled_by_caller(batch)
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        return self.forward_episode(batch)

    @override
    def training_step(self, batch: Episode, batch_idx: int) -> Optional[Tensor]:
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        outputs = self.forward_episode(batch)
        return self.finish_training_step(batch, outputs, self.meta_loss(batch, outputs))

    def finish_training_step(self, batch: Episode, outputs: Tensor, loss: Tensor) -> Optional[Tensor]:
        """Log a training step and return its meta-loss; a non-finite one stops training naming the step, or with
        ``nonfinite="skip"`` skips the meta-batch (under DDP all ranks decide together)."""
        if not self._all_finite(loss):
            step = self.trainer.global_step if self._trainer is not None else 0
            where = f"is {loss.item()}" if not torch.isfinite(loss) else "is finite here but not on another process"
            if self.hparams.nonfinite == "skip":
                rank_zero_warn(f"Skipped meta-batch at global step {step}: the meta-loss {where}.")
                return self._skipped_loss()
            raise FloatingPointError(
                f"The meta-loss {where} at global step {step} (epoch {self.current_epoch}, batch "
                f"{trainer_view.batch_index(self._trainer)}). Training stopped before the model was updated. Lower "
                "the learning rates, check the inputs for NaNs, or pass nonfinite='skip' to skip such meta-batches."
            )
        self._log_step(batch, outputs.detach(), "train", loss.detach())
        return loss

    def _evaluate(self, batch: Episode, stage: str, dataloader_idx: int = 0) -> None:
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        self._log_step(batch, self.forward_episode(batch).detach(), stage, dataloader_idx=dataloader_idx)

    def _skipped_loss(self) -> Optional[Tensor]:
        """What a skipped training step returns: ``None`` in one process, where Lightning then runs no backward: the
        meta-batch adds nothing to the gradients, and where it ends an accumulation window the optimizer still steps
        on what the window's other meta-batches gave (under a gradient scaler, Lightning skips that step and the
        scaler's update instead). Under DDP every rank must join the gradient all-reduce (Lightning refuses ``None``
        there), so all ranks return a zero loss of every trainable parameter, whose gradient adds exactly nothing, and
        :meth:`on_after_backward` makes the rest equal to one process: gradients that this backward created are taken
        away again, and under a scaler at the end of a window the step is skipped (NaN gradients) and the scaler's
        state restored (:meth:`on_train_batch_end`)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        self._skip = _Skip(ends_window=not trainer_view.accumulating(self._trainer))
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        if self._skip is not None:  # after Lightning's zero_grad, which runs after the training step
            self._skip.without_gradient = [p for p in self.parameters() if p.requires_grad and p.grad is None]

    @override
    def on_after_backward(self) -> None:
        skip, self._skip = self._skip, None
        if skip is None:
            return
        for p in skip.without_gradient:  # zeros from the skipped meta-batch's backward: as if it had none
            p.grad = None
        scaler = trainer_view.gradient_scaler(self._trainer)
        if scaler is not None and skip.ends_window:  # one process: no optimizer step, no scaler update
            self._scaler_state = scaler.state_dict()
            for p in self.parameters():
                if p.grad is not None:
                    p.grad = torch.full_like(p.grad, float("nan"))

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._scaler_state is not None:  # the scaler saw a skipped step: its scale and growth are as before it
            trainer_view.gradient_scaler(self._trainer).load_state_dict(self._scaler_state)
            self._scaler_state = None

    def _all_finite(self, loss: Tensor) -> bool:
        """Whether the meta-loss is finite on every process: under DDP all ranks take the same decision (skip, or
        stop), so no rank waits in a gradient all-reduce that another rank skipped."""
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def _stream_metrics(self, stage: str, index: int) -> tuple[EpisodeMean, EpisodeMean, EpisodeCount]:
        """The value, loss and divergence metrics of evaluation stream ``index`` of ``stage`` (one per named set; the
        first set's are built with the learner, the others on first use, on the learner's device)."""
        key = stage if index == 0 else f"{stage}{index}"
        if f"{key}_value" not in self.metrics:
            self.metrics[f"{key}_value"] = EpisodeMean().to(self.device)
            self.losses[f"{key}_loss"] = EpisodeMean().to(self.device)
            self.diverged[f"{key}_diverged"] = EpisodeCount().to(self.device)
        return self.metrics[f"{key}_value"], self.losses[f"{key}_loss"], self.diverged[f"{key}_diverged"]

    def _log_step(self, batch: Episode, outputs: Tensor, stage: str, loss: Optional[Tensor] = None,
                  dataloader_idx: int = 0) -> None:
        regression = batch.is_regression
        self._regression = regression
        if stage == "train" and self._trainer is None:
            return  # a bare training_step call (tests, notebooks, benchmarks) has nowhere to log
        per_task = per_task_loss(outputs, batch.query_y, target_ndim(batch.query_y, 1))
        value = per_task if regression else episode_accuracy(outputs, batch.query_y)
        b = batch.num_tasks
        name = "mse" if regression else "acc"
        if stage != "train":  # a diverged task (NaN outputs, e.g. MAML's inner loop) is counted, not averaged
            ok = torch.isfinite(outputs.flatten(1).float()).all(1)
            values, losses, diverged = self._stream_metrics(stage, dataloader_idx)
            diverged.update(~ok)
            values.update(value[ok])
            losses.update(per_task[ok])
        else:
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log(f"train/{name}", value.mean(), prog_bar=True, batch_size=b)

    def _log_epoch(self, stage: str) -> None:
        names = trainer_view.evaluation_set_names(self._trainer, stage)  # named sets: {"cub": loader, ...}
        for index in range(len(names) if names else 1):
            prefix = f"{stage}/{names[index]}" if names else stage
            values, losses, diverged_count = self._stream_metrics(stage, index)
            if values.update_count == 0 and self._regression is None:
                continue
            name = "mse" if self._regression else "acc"
            mean, ci95 = values.compute()
            loss, _ = losses.compute()
            diverged = diverged_count.compute()
            self.log_dict({f"{prefix}/loss": loss, f"{prefix}/{name}": mean, f"{prefix}/{name}_ci95": ci95},
                          prog_bar=stage == "val")
            self.log(f"{prefix}/diverged", diverged.float())
            if diverged > 0:
                rank_zero_warn(f"{int(diverged)} {prefix} tasks diverged (non-finite outputs) and are left out of "
                               f"{prefix}/{name}, which averages the other tasks; lower the inner learning rate.")
            for metric in (values, losses, diverged_count):
                metric.reset()

    @override
    def validation_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx)

    @override
    def test_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx)

    @override
    def predict_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Query outputs of the meta-batch: logits ``[B, M, N]``, or predictions shaped like ``query_y``."""
        return self(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ------------------------------------------------------------------ checkpoints
    @override
    def setup(self, stage: str) -> None:
        # runs before Lightning restores a checkpoint: read it through an IO whose errors name a broken file
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = CheckedCheckpointIO()
        trainer_view.swa_updates_only_running_statistics(self.trainer)
        compiler = trainer_view.take_over_compilation(self)
        if compiler is not None:  # trainer.fit(torch.compile(learner)): the cores, not the step methods
            self.use_compiler(compiler)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_meta_rng"] = rng_states()
        checkpoint["lightning_meta_learner"] = f"{type(self).__module__}.{type(self).__qualname__}"
        spec = backbone_spec(self.backbone)
        if spec is not None:  # lets load_from_checkpoint rebuild the backbone without being given one
            checkpoint["lightning_meta_backbone"] = spec

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only a resumed fit continues the saved random streams; loading weights must not reseed a later, other run
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        self._pending_rng = checkpoint.get("lightning_meta_rng") if resuming else None

    @override
    def on_train_start(self) -> None:
        # Lightning does not restore global RNG states; a resumed run continues the saved streams (dropout...)
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``; a missing, corrupt or truncated file gets an error naming it. The
        backbone is rebuilt from the checkpoint when it is one of :mod:`lightning_meta.models` (they record their
        arguments); for any other module pass it again: ``load_from_checkpoint(path, backbone=MyNet(...))``."""
        checkpoint = read_checkpoint(checkpoint_path, map_location="cpu", weights_only=kwargs.get("weights_only"))
        if cls is MetaLearner:
            saved = checkpoint.get("lightning_meta_learner")
            name = saved.rsplit(".", 1)[-1] if saved else None
            raise TypeError(
                "MetaLearner is the base class of the learners and cannot be loaded itself: "
                + (f"{checkpoint_path} holds a {name}, so load it with {name}.load_from_checkpoint(path) "
                   f"(from {saved.rsplit('.', 1)[0]})." if saved else
                   f"load {checkpoint_path} with the learner class that saved it, e.g. MAML.load_from_checkpoint(path) "
                   "(MAML, ANIL, MetaSGD, ProtoNet, AttentionLearner or Pretrainer)."))
        if "backbone" not in kwargs and not args:
            spec = checkpoint.get("lightning_meta_backbone")
            if spec is None:
                raise TypeError(
                    f"The checkpoint {checkpoint_path} was trained with a backbone that is not one of "
                    "lightning_meta.models, so it cannot be rebuilt from the file: pass it again, e.g. "
                    f"{cls.__name__}.load_from_checkpoint(path, backbone=MyNet(...)), built as for training."
                )
            kwargs["backbone"] = build_backbone(spec)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ optimizers
    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        name = hp.optimizer
        kwargs = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if name == "sgd":
            kwargs["momentum"] = 0.9
        exempt = {id(p) for p in self.no_weight_decay()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in exempt]}]
        if exempt:
            groups.append({"params": [p for p in self.parameters() if id(p) in exempt], "weight_decay": 0.0})
        optimizer = OPTIMIZERS[name](groups, **kwargs)
        schedule = hp.lr_scheduler
        if schedule is None:
            return optimizer
        if schedule == "cosine":
            total = max(self.total_training_steps(), 1)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_step_epochs, hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Parameters the outer optimizer never decays (MAML family: the learned inner learning rates, which decay
        would pull towards zero, i.e. towards no adaptation)."""
        return []

    def total_training_steps(self) -> int:
        """Optimizer steps of the whole run. For an EpisodicDataModule this is arithmetic: Lightning's
        ``estimated_stepping_batches`` would iterate the training loader before a checkpoint is restored, and the
        first batch it prefetches then would not be the resumed position."""
        t = self.trainer
        per_epoch = getattr(t.datamodule, "steps_per_epoch", None)
        if per_epoch is None or t.max_epochs is None or t.max_epochs < 0:
            return int(t.estimated_stepping_batches)
        batches = per_epoch()
        limit = t.limit_train_batches
        batches = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
        total = math.ceil(batches / t.accumulate_grad_batches) * t.max_epochs
        return min(total, t.max_steps) if t.max_steps and t.max_steps > 0 else total

    # ------------------------------------------------------------------ single-task helpers
    @contextlib.contextmanager
    def mode(self, training: bool) -> Iterator[None]:
        """Training or evaluation mode for the duration, then the previous mode again."""
        was_training = self.training
        self.train(training)
        try:
            yield
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def gradients_enabled(self) -> Iterator[bool]:
        """Gradients for the duration even inside Lightning's inference mode (validation, testing: MAML adapts there);
        yields whether inference mode was on (its tensors then need normal copies to enter autograd)."""
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if inference else contextlib.nullcontext(), torch.enable_grad():
            yield inference

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluation mode without gradients for the duration, then the previous mode again."""
        with self.mode(training=False), torch.no_grad():
            yield

    def _single_task(self, support_x: Tensor, support_y: Tensor) -> tuple[Episode, int]:
        """Check one task's support set and return it as a meta-batch of one, with its number of ways. Errors speak of
        the task the user passed (no meta-batch dimension)."""
        if isinstance(support_y, (list, tuple)) and any(isinstance(v, str) for v in support_y):
            raise TypeError("`adapt` takes the support labels as integers 0..N-1 (or float targets), but got strings: "
                            "number the classes first, e.g. names = sorted(set(labels)); "
                            "support_y = torch.tensor([names.index(n) for n in labels]).")
        support_x, support_y = self.as_inputs(support_x, "support_x"), as_targets(support_y, "support_y")
        if support_x.dim() == 0 or support_y.dim() == 0 or len(support_x) != len(support_y):
            raise ValueError(
                f"`adapt` takes one task: support_x [n, ...] with one label or target per example in support_y, but got "
                f"{len(support_x) if support_x.dim() else 'a scalar'} examples (shape {tuple(support_x.shape)}) and "
                f"{len(support_y) if support_y.dim() else 'a scalar'} labels (shape {tuple(support_y.shape)}).")
        if not support_y.is_floating_point() and support_y.dim() == 1 and len(support_y):
            classes = torch.unique(support_y)
            if classes[0] != 0 or classes[-1] != len(classes) - 1:
                shown = ", ".join(str(int(c)) for c in classes[:8]) + (", ..." if len(classes) > 8 else "")
                raise ValueError(
                    f"`adapt` takes the support labels as 0..N-1 for N classes, but got the labels {{{shown}}} "
                    f"({len(classes)} classes): number them 0..{len(classes) - 1} first, e.g. "
                    "support_y = torch.unique(support_y, return_inverse=True)[1] (and map predictions back the same way).")
        if support_y.dim() != 1 and not (support_y.is_floating_point() and support_y.dim() == 2):
            raise ValueError(
                f"`adapt` takes one task without a batch dimension: support_y must be [N*K] labels or targets, or "
                f"[N*K, D] vector targets, but got shape {tuple(support_y.shape)}. For a meta-batch, call the learner "
                "on an Episode instead."
            )
        x, y = support_x.unsqueeze(0), support_y.to(support_x.device).unsqueeze(0)
        batch = Episode(x, y, x[:, :1], y[:, :1])
        return batch, self.check_episode(batch)


def as_targets(y: Tensor, name: str = "labels") -> Tensor:
    """Labels as int64 whatever their integer width (int32 and uint8 labels are common in datasets); float targets
    (regression) as they are. Boolean labels are refused: say which classes they are with integers 0..N-1.

    Example:
        >>> as_targets(torch.tensor([0, 1], dtype=torch.int32)).dtype
        torch.int64
    """
    y = torch.as_tensor(y)
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"Expected `{name}` to be integer class labels 0..N-1 or float regression targets, but got "
                        f"{y.dtype}.")
    return y if y.is_floating_point() else y.long()


def check_episode(batch: Episode) -> int:
    """Shapes, dtypes and label ranges of a meta-batch; returns N (1 for regression). Errors name the mismatch."""
    if not isinstance(batch, tuple) or len(batch) != 4:
        raise TypeError(f"Expected an Episode (support_x, support_y, query_x, query_y), but got {type(batch).__name__}.")
    sx, sy, qx, qy = batch
    for name, t in zip(Episode._fields, batch):
        if not isinstance(t, Tensor):
            raise TypeError(f"Episode.{name} must be a tensor, but got {type(t).__name__}.")
    vector = sy.is_floating_point() and sy.dim() == 3 and qy.dim() == 3  # [B, n, D] regression targets
    if not vector and (sy.dim() != 2 or qy.dim() != 2):
        raise ValueError(
            f"Expected support_y [B, N*K] and query_y [B, M] with a meta-batch dimension (or [B, N*K, D] and "
            f"[B, M, D] float targets for D-dimensional regression), but got shapes {tuple(sy.shape)} and "
            f"{tuple(qy.shape)}."
        )
    if vector and sy.shape[2] != qy.shape[2]:
        raise ValueError(f"Support and query targets differ in size: {sy.shape[2]} vs {qy.shape[2]} per example.")
    if sx.shape[:2] != sy.shape[:2] or qx.shape[:2] != qy.shape[:2]:
        raise ValueError(
            f"Episode inputs and labels disagree: support_x {tuple(sx.shape)} vs support_y {tuple(sy.shape)}, "
            f"query_x {tuple(qx.shape)} vs query_y {tuple(qy.shape)} (the first two dimensions must match)."
        )
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(f"Support and query inputs differ in shape: {tuple(sx.shape[2:])} vs {tuple(qx.shape[2:])}.")
    if sy.shape[1] == 0:
        raise ValueError("The episode's support set is empty: a task needs at least one labelled example to adapt on.")
    if qy.shape[1] == 0:
        raise ValueError("The episode's query set is empty: there is nothing to predict.")
    if sy.is_floating_point() != qy.is_floating_point():
        raise TypeError(f"support_y is {sy.dtype} but query_y is {qy.dtype}: both must be integer labels "
                        "(classification) or both float targets (regression).")
    _check_finite(batch)
    return 1 if sy.is_floating_point() else _check_labels(sy, qy)


def _check_finite(batch: Episode) -> None:
    sx, sy, qx, qy = batch
    floats = [t for t in batch if t.is_floating_point()]
    if not surely_finite(floats):  # the exact checks run only when the quick one fails
        for name, t in (("support_x", sx), ("query_x", qx)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"Episode.{name} contains NaN or infinite values: clean the inputs before training.")
        if sy.is_floating_point() and not (torch.isfinite(sy).all() and torch.isfinite(qy).all()):
            raise ValueError("Episode regression targets contain NaN or infinite values.")


def _check_labels(sy: Tensor, qy: Tensor) -> int:
    """Class labels ``0..N-1`` with every class in every task's support set; returns N."""
    lo, hi = int(torch.minimum(sy.min(), qy.min())), int(sy.max())
    if lo < 0:
        raise ValueError(f"Episode labels must be 0..N-1, but found label {lo}.")
    n_way = hi + 1
    q_hi = int(qy.max())
    if q_hi >= n_way:
        raise ValueError(
            f"A query label ({q_hi}) is outside the support labels 0..{n_way - 1}: every query class must appear in "
            "the support set."
        )
    counts = torch.zeros(sy.shape[0], n_way, dtype=torch.long, device=sy.device).scatter_add_(1, sy, torch.ones_like(sy))
    if (counts == 0).any():
        missing = int((counts == 0).nonzero()[0, 1])
        raise ValueError(
            f"Support labels must cover 0..N-1 with N={n_way}, but class {missing} has no support example in some "
            "task: relabel each task's classes 0..N-1."
        )
    return n_way
