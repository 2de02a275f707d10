"""MetaLearner: the LightningModule base every learner shares."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta import trainer_view
from lightning_meta._checks import check_choice, check_positive
from lightning_meta.checkpoint import (
    CheckedCheckpointIO,
    base_class_error,
    read_checkpoint,
    rng_states,
    saved_backbone_spec,
    set_rng_states,
)
from lightning_meta.compile import CompiledCores
from lightning_meta.data.checks import (
    as_inputs,
    as_targets,
    check_episode,
    check_meta_batch,
    check_ragged,
    task_as_episode,
)
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.learners.episode_log import EpisodeLog
from lightning_meta.learners.nonfinite import NonFinitePolicy
from lightning_meta.learners.widths import probe_backbone
from lightning_meta.models import Normalization, backbone_spec, build_backbone, record_input_normalization
from lightning_meta.models import input_normalization as backbone_normalization

Batch = Union[Episode, RaggedEpisode]  # a fixed-shape meta-batch, or one whose tasks differ in shape

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = (None, "cosine", "step")


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


class MetaLearner(CompiledCores, L.LightningModule):
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
        normalize: the inputs' normalisation on the device, after ``uint8`` images become floats in [0, 1]:
            ``(mean, std)``, one value per channel (or one for all), gives ``(x - mean) / std`` over the channel
            dimension of ``[..., C, H, W]`` inputs, in training, evaluation, :meth:`adapt` and its predictor alike
            (MAML's inner loop adapts on the normalised support set); ``None`` leaves the inputs as they are;
            ``"auto"`` (the default) uses the backbone's own (:func:`~lightning_meta.models.input_normalization`:
            pretrained timm and torchvision weights' mean and std), else none. Stored resolved in the checkpoint,
            so a reloaded learner normalises as it trained.

    Logged: ``train/loss`` and ``train/acc`` (or ``train/mse``); ``val/loss``, ``val/acc`` and ``val/acc_ci95``
    (classification) or ``val/mse`` and ``val/mse_ci95`` (regression); likewise ``test/*``. Named evaluation sets
    (``val={"a": A, "b": B}``) log ``val/a/acc``, ... and, as ``val/acc``, ``val/loss``, the mean over the sets, with
    ``val/acc_ci95`` the interval of that mean (:mod:`~lightning_meta.learners.episode_log`).

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
        normalize: Union[str, Sequence[Union[float, Sequence[float]]], None] = "auto",
    ) -> None:
        super().__init__(compile)
        check_positive("lr", lr)
        check_choice("optimizer", optimizer, sorted(OPTIMIZERS))
        check_choice("lr_scheduler", lr_scheduler, SCHEDULERS)
        check_choice("nonfinite", nonfinite, ("raise", "skip"))
        # every option of the learner, its subclass's included (Lightning collects the arguments of each __init__ in
        # the chain), stored once; the modules passed in are not hyperparameters
        self.save_hyperparameters(ignore=["backbone"])
        if normalize != "auto":  # checked now; "auto" is resolved when the backbone arrives (plain_backbone)
            self.hparams.normalize = _stored(check_normalize(normalize))
        self.episode_log = EpisodeLog()  # per-stage, per-evaluation-set episode metrics
        self.nonfinite_policy = NonFinitePolicy()
        self._pending_rng: Optional[dict] = None
        self._normalize_tensors: dict[tuple, tuple[Tensor, Tensor]] = {}  # see _normalization

    backbone: nn.Module
    # whether forward_episode (and the steps) compute on RaggedEpisode meta-batches; a learner written for fixed
    # [B, n, ...] tensors is refused one with an error instead of reading its concatenated tasks as one
    accepts_ragged: bool = False

    if TYPE_CHECKING:  # Lightning types hparams as a MutableMapping; ours is always its AttributeDict

        @property
        def hparams(self) -> AttributeDict: ...

    # ------------------------------------------------------------------ what subclasses implement
    def forward_episode(self, batch: Batch) -> Tensor:
        """Query outputs ``[B, M, N]`` (logits) or ``[B, M]`` (regression) for a meta-batch of tasks."""
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        """Adapt to one new task (no batch dimension) and return a predictor for its queries."""
        raise NotImplementedError

    def meta_loss(self, batch: Batch, outputs: Tensor) -> Tensor:
        """The loss the outer loop minimises (default: the mean over tasks of each task's mean query loss; for a
        :class:`~lightning_meta.data.RaggedEpisode` each task's own queries and classes)."""
        return batch.task_losses(outputs).mean()

    def check_episode(self, batch: Batch) -> int:
        """Validate a meta-batch before any work; returns its number of ways (1 for regression; for a
        :class:`~lightning_meta.data.RaggedEpisode` the most ways of a task)."""
        if isinstance(batch, RaggedEpisode):
            return check_ragged(batch)
        return check_episode(batch)

    def as_inputs(self, x: Tensor, name: str = "inputs") -> Tensor:
        """Inputs on the learner's device in the dtype of its weights: other float dtypes are cast (float64 data in a
        float32 model), and ``uint8`` images (what image datasets put in episodes, a quarter of float32's bytes) are
        moved first and converted there to floats in [0, 1] (``x / 255``, computed in float32)."""
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        device = weight.device if weight is not None else x.device if isinstance(x, Tensor) else None
        return as_inputs(x, weight, self._normalization(device), name)

    def plain_backbone(self, backbone: nn.Module) -> nn.Module:
        """The backbone a learner keeps (see :class:`~lightning_meta.compile.CompiledCores`); ``normalize="auto"``
        becomes the backbone's own normalisation here, and the backbone records the learner's (a learner built on it
        later, e.g. ``ProtoNet(pretrainer.backbone)``, normalises as it was trained)."""
        plain = super().plain_backbone(backbone)
        self._resolve_normalize(plain)
        return plain

    @property
    def input_normalization(self) -> Optional[Normalization]:
        """The resolved ``normalize``: ``(mean, std)`` per channel, or ``None``."""
        if self.hparams.normalize == "auto":  # a learner that keeps its backbone without plain_backbone
            self._resolve_normalize(getattr(self, "backbone", None))
        value = self.hparams.normalize
        return None if value is None else (tuple(value[0]), tuple(value[1]))

    def _resolve_normalize(self, backbone: Optional[nn.Module]) -> None:
        if self.hparams.normalize == "auto":
            self.hparams.normalize = _stored(backbone_normalization(backbone) if backbone is not None else None)
        if backbone is not None:
            record_input_normalization(backbone, self.input_normalization)

    def _normalization(self, device: Optional[torch.device]) -> Optional[tuple[Tensor, Tensor]]:
        """``input_normalization`` as float32 tensors on ``device`` (the weights', made once per device and value)."""
        pair = self.input_normalization
        if pair is None:
            return None
        device = device or torch.device("cpu")
        key = (device, pair)
        if key not in self._normalize_tensors:
            self._normalize_tensors = {key: (torch.tensor(pair[0], device=device), torch.tensor(pair[1], device=device))}
        return self._normalize_tensors[key]

    def prepare_episode(self, batch: Any) -> Batch:
        """A meta-batch in the form the learners compute on: integer labels of any width as int64 (bool labels are
        refused), inputs as floats in the weights' dtype (:meth:`as_inputs`). Raises for anything but a 4-tuple or a
        :class:`~lightning_meta.data.RaggedEpisode` (which stays one, its tensors converted)."""
        if isinstance(batch, RaggedEpisode):
            if not self.accepts_ragged:
                raise TypeError(
                    f"{type(self).__name__} computes on fixed-shape Episodes ([B, n, ...] tensors), but this meta-batch "
                    f"is a RaggedEpisode ({batch.num_tasks} tasks of different shapes, concatenated: variable "
                    "episodes). Give the data module numbers for n_way, n_shot and n_query, or handle RaggedEpisode "
                    "in forward_episode (its task(i), pad(), pad_outputs()) and set `accepts_ragged = True` on the "
                    "class.")
            return batch.replace(self.as_inputs(batch.support_x, "support_x"), as_targets(batch.support_y, "support_y"),
                                 self.as_inputs(batch.query_x, "query_x"), as_targets(batch.query_y, "query_y"))
        sx, sy, qx, qy = check_meta_batch(batch)
        return Episode(self.as_inputs(sx, "support_x"), as_targets(sy, "support_y"), self.as_inputs(qx, "query_x"),
                       as_targets(qy, "query_y"))

    # ------------------------------------------------------------------ steps
    @override
    def forward(self, batch: Batch) -> Tensor:
        """Query outputs of a meta-batch (see :meth:`forward_episode`), after the same checks as a training step."""
        if torch.compiler.is_compiling():  # called through torch.compile(learner): compile the cores instead
            return self._forward_compiled_by_caller(batch)
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        return self.forward_episode(batch)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> Optional[Tensor]:
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        outputs = self.forward_episode(batch)
        return self.finish_training_step(batch, outputs, self.meta_loss(batch, outputs))

    def finish_training_step(self, batch: Batch, outputs: Tensor, loss: Tensor) -> Optional[Tensor]:
        """Log a training step and return its meta-loss; a non-finite one stops training naming the step, or with
        ``nonfinite="skip"`` skips the meta-batch (under DDP all ranks decide together)."""
        reviewed = self.nonfinite_policy.review(self, loss)
        if reviewed is loss:
            self.episode_log.step(self, batch, outputs.detach(), "train", loss.detach())
        return reviewed

    def _evaluate(self, batch: Batch, stage: str, dataloader_idx: int = 0, batch_idx: Optional[int] = None) -> None:
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        self.episode_log.step(self, batch, self.forward_episode(batch).detach(), stage, dataloader_idx=dataloader_idx,
                              batch_idx=batch_idx)

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        self.nonfinite_policy.before_backward(self)

    @override
    def on_after_backward(self) -> None:
        self.nonfinite_policy.after_backward(self)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.nonfinite_policy.after_batch(self)

    @override
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx, batch_idx)

    @override
    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx, batch_idx)

    @override
    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Query outputs of the meta-batch: logits ``[B, M, N]``, or predictions shaped like ``query_y``."""
        return self(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self.episode_log.epoch(self, "val")

    @override
    def on_test_epoch_end(self) -> None:
        self.episode_log.epoch(self, "test")

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
        probe_backbone(self, stage)  # a backbone that does not fit the data is named now, not deep in the first step

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
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``; a missing, corrupt or truncated file gets an error naming it. The
        backbone is rebuilt from the checkpoint when it is one of :mod:`lightning_meta.models` (they record their
        arguments); for any other module pass it again: ``load_from_checkpoint(path, backbone=MyNet(...))``."""
        checkpoint = read_checkpoint(checkpoint_path, map_location="cpu", weights_only=kwargs.get("weights_only"))
        if cls is MetaLearner:
            raise base_class_error(checkpoint, checkpoint_path)
        if "backbone" not in kwargs and not args:
            kwargs["backbone"] = build_backbone(saved_backbone_spec(checkpoint, checkpoint_path, cls.__name__))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ optimizers
    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        name = hp.optimizer
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if name == "sgd":
            kwargs["momentum"] = 0.9
        exempt = {id(p) for p in self.no_weight_decay()}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.parameters() if id(p) not in exempt]}]
        if exempt:
            groups.append({"params": [p for p in self.parameters() if id(p) in exempt], "weight_decay": 0.0})
        optimizer = OPTIMIZERS[name](groups, **kwargs)
        schedule = hp.lr_scheduler
        if schedule is None:
            return optimizer
        if schedule == "cosine":
            total = max(self.total_training_steps(), 1)
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                                                                        T_max=total)
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
        return trainer_view.total_training_steps(self.trainer)

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
        """Check one task's support set and return it as a meta-batch of one, with its number of ways."""
        batch = task_as_episode(support_x, support_y, self.as_inputs)
        return batch, self.check_episode(batch)


def check_normalize(value: Any) -> Optional[Normalization]:
    """A learner's ``normalize`` as ``((mean, ...), (std, ...))``, or ``None``; anything else is refused with the forms
    it takes.

    Example:
        >>> check_normalize(([0.5, 0.4, 0.3], 0.2))
        ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    """
    if value is None:
        return None
    form = ("Expected `normalize` to be (mean, std), each a number or one number per input channel (e.g. ImageNet's "
            "((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))), None for no normalisation, or \"auto\" for the "
            "backbone's own")
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{form}, but got {value!r}.")
    parts = []
    for part in value:
        part = part.tolist() if isinstance(part, Tensor) else part
        part = [part] if isinstance(part, (int, float)) and not isinstance(part, bool) else part
        if (not isinstance(part, Sequence) or isinstance(part, str) or not part
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part)):
            raise ValueError(f"{form}, but got {value!r}.")
        parts.append(tuple(float(v) for v in part))
    mean, std = parts
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ValueError(f"`normalize` has {len(mean)} means but {len(std)} stds: give one per channel for both.")
    width = max(len(mean), len(std))
    mean, std = mean * (width // len(mean)), std * (width // len(std))
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"`normalize` needs finite means and positive, finite stds, but got {value!r}.")
    return mean, std


def _stored(pair: Optional[Normalization]) -> Optional[list[list[float]]]:
    """How ``normalize`` is stored in hparams (and so in checkpoints and YAML): lists."""
    return None if pair is None else [list(pair[0]), list(pair[1])]
