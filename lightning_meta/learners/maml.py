"""MAML (Finn, Abbeel & Levine, ICML 2017) and its variants: first-order MAML, ANIL (Raghu et al. 2020), Meta-SGD
(Li et al. 2017) and the MAML++ options of Antoniou et al. (2019). How a meta-batch runs (vmap or a loop, chunks,
streamed meta-gradients, loss scales) is :class:`~lightning_meta.functional.MetaBatchEngine`; this file decides
what adapts, at which rates, for how many steps, and what the meta-loss is."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta import trainer_view
from lightning_meta._checks import check_choice, check_int, check_positive
from lightning_meta.compile import eager_for_ragged
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.functional.engine import BATCH_NORM, Adapted, MetaBatchEngine, Streamed, TaskGroup, batch_norms
from lightning_meta.functional.episode import like_targets, msl_weights, per_task_loss, target_ndim
from lightning_meta.functional.inner_loop import HEAD_INITS, Head, Params
from lightning_meta.learners.base import MetaLearner, TaskPredictor

Batch = Union[Episode, RaggedEpisode]


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning: adapt all parameters by ``inner_steps`` gradient steps on each task's support set
    and update the initialization through those steps (second order, or first order by flag).

    The inner loop is a pure function of (params, support) on ``torch.func`` (no module cloning). Inner gradients
    never touch ``.grad``, so no DDP hook fires inside the inner loop; Lightning owns the outer backward, gradient
    scaling, clipping and DDP synchronisation. Validation and testing adapt with gradients even under Lightning's
    default ``inference_mode=True``; a task whose inner loop diverges there is counted (``val/diverged``), not fatal.

    Batch norm: running statistics are turned off on the backbone; the support set normalises with its own statistics
    in every inner step, and the queries with the support's (``batch_norm="support"``) or their own
    (``"transductive"``), in training and evaluation alike. Under mixed precision it runs in float32 inside the
    inner loop (its float16 double backward gives NaN).

    Args:
        backbone: network whose outputs are the N-way logits (``Conv4(out_features=N)``) or regression outputs.
        inner_lr: inner-loop step size (the initial value when learned).
        inner_steps: inner steps while meta-training.
        eval_inner_steps: inner steps in validation, testing and :meth:`adapt` (default: ``inner_steps``).
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: learn one inner rate per parameter tensor (per layer).
        per_step_lr: MAML++ LSLR: learn one rate per parameter tensor and per inner step (with :class:`MetaSGD`, one
            per parameter element and per step). There is a learned rate for each of the ``inner_steps`` steps only,
            so ``eval_inner_steps`` may not be larger.
        multi_step_loss: MAML++ MSL: the meta-loss weighs the query loss after every inner step, annealed to the last
            step over ``msl_epochs`` epochs.
        first_order_epochs: MAML++ derivative-order annealing: first order for the first epochs, then second.
        task_parallel: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`~lightning_meta.functional.MetaBatchEngine`;
            ``"auto"``: vmap on a GPU, and on a CPU for networks without convolutions).
        task_chunk: tasks whose meta-gradient is taken together in training, as soon as they are done, their graph
            then freed: peak memory is that of ``task_chunk`` tasks. With vmap they run in one call (``None``: the
            whole meta-batch); on the loop ``None`` means one task at a time.
        stream_meta_gradients: take meta-gradients chunk by chunk where the engine streams (the loop, or vmap with
            ``task_chunk``); ``False`` keeps the whole meta-batch's graph until Lightning's backward.
        inner_loss_scale: loss scale of the inner loop (``None``: 1024 under float16 precision, else 1), so small
            inner gradients do not underflow in float16.
        batch_norm: how batch norm normalises the queries. ``"support"`` (the default): with the statistics of the
            task's (adapted) support set, so a query's prediction is the same alone or in any batch: what a deployed
            ``adapt(support)(query)`` gives one image at a time, and an evaluation that uses no information a real
            query lacks (Bronskill et al. 2020, "TaskNorm"). ``"transductive"``: with the query batch's own
            statistics, as the MAML paper's code did: for reproducing published numbers (the README measures both).
        zero_head: every task's inner loop starts the head (the adapted module's last ``nn.Linear``) at zero instead
            of a learned initialization (the "zeroing trick" of Ye & Chao 2022, "How to Train Your MAML to Excel in
            Few-Shot Classification"): no class is favoured before adaptation, and the first inner step makes the head
            a prototype classifier of the support features, which the body is meta-trained for. The head's
            parameters are then zeros, not trained; it suits a body pretrained with :class:`Pretrainer`.
        allow_wider_head: a backbone with more outputs than an episode has classes is refused (it would train as a
            wider classifier without a word); ``True`` allows it (the outputs past the episode's classes are then
            trained as classes that never appear). For episodes of varying way use ``variable_ways`` instead.
        variable_ways: episodes of varying way (Meta-Dataset's): the head has ``max_way`` outputs and a task of ``N``
            classes uses its first ``N`` only (the others' logits are removed, not masked), in the inner loop, the
            query logits ``[M, N]`` and :meth:`adapt`. Set at ``setup`` when the trainer's data module has
            ``variable_episodes`` (a head narrower than its ``max_way`` is refused there); a
            :class:`~lightning_meta.RaggedEpisode` meta-batch always runs this way. The head (the adapted module's
            last ``nn.Linear``) must be its output layer.
        head_init: where each task's inner loop starts the head (the adapted module's last ``nn.Linear``):
            ``"learned"``, its meta-learned initialization; ``"prototypes"``, Proto-MAML (Triantafillou et al.
            2020, "Meta-Dataset"): ``W_k = 2 c_k``, ``b_k = -|c_k|^2`` from the prototypes ``c_k`` of the head's input
            features of the task's support set, computed with the body's current parameters, so the first step starts
            from the ProtoNet classifier and the meta-gradient flows through the prototypes into the body (with
            ``first_order=True`` too: only the inner gradients are constants, as in the reference's fo-Proto-MAML).
            The head's own parameters are then unused: they are frozen (``requires_grad=False``: they never get a
            gradient, so the optimizer never moves them and DDP does not wait for them) and kept only for their
            shape (its learned rates, with ``learn_inner_lr`` or :class:`MetaSGD`, are trained). Needs the head to be
            the output layer, with a bias.
        **kwargs: optimizer, scheduler and ``nonfinite`` options of :class:`MetaLearner`.

    Example:
        >>> from lightning_meta.models import MLP
        >>> maml = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=1)
        >>> ep = Episode(torch.randn(4, 10, 1), torch.randn(4, 10), torch.randn(4, 10, 1), torch.randn(4, 10))
        >>> maml(ep).shape                # predictions shaped like the targets
        torch.Size([4, 10])
        >>> maml.adapt(ep.support_x[0], ep.support_y[0])(torch.randn(3, 1)).shape
        torch.Size([3])
    """

    accepts_ragged = True  # RaggedEpisode meta-batches: each task on its own examples and classes

    meta_sgd = False  # MetaSGD: one learned rate per parameter element

    def __init__(self, backbone: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1,
                 eval_inner_steps: Optional[int] = None, first_order: bool = False, learn_inner_lr: bool = False,
                 per_step_lr: bool = False, multi_step_loss: bool = False, msl_epochs: int = 10,
                 first_order_epochs: int = 0, task_parallel: str = "auto", task_chunk: Optional[int] = None,
                 stream_meta_gradients: bool = True, inner_loss_scale: Optional[float] = None,
                 batch_norm: str = "support", zero_head: bool = False, allow_wider_head: bool = False,
                 variable_ways: bool = False, head_init: str = "learned", **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        check_positive("inner_lr", inner_lr)
        check_choice("head_init", head_init, HEAD_INITS)
        if zero_head and head_init != "learned":
            raise ValueError(f"zero_head=True and head_init={head_init!r} both choose where the head starts: pass one.")
        for name, value, minimum in (("inner_steps", inner_steps, 1), ("msl_epochs", msl_epochs, 1),
                                     ("first_order_epochs", first_order_epochs, 0)):
            check_int(name, value, minimum)
        for name, optional in (("eval_inner_steps", eval_inner_steps), ("task_chunk", task_chunk)):
            if optional is not None:
                check_int(name, optional, 1)
        if inner_loss_scale is not None:
            check_positive("inner_loss_scale", inner_loss_scale)
        if per_step_lr and eval_inner_steps is not None and eval_inner_steps > inner_steps:
            raise ValueError(
                f"per_step_lr=True learns one inner rate per step for inner_steps={inner_steps} steps, so "
                f"eval_inner_steps={eval_inner_steps} would take steps that have no learned rate: set "
                f"eval_inner_steps <= {inner_steps}, raise inner_steps, or use learn_inner_lr=True (one rate for every step).")
        self.backbone = backbone = self.plain_backbone(backbone)
        for norm in batch_norms(backbone):  # per-task statistics, as in Finn et al.'s reference code
            norm.track_running_stats = False
            norm.running_mean = norm.running_var = norm.num_batches_tracked = None
        module = self.adapted_module()
        if not first_order or first_order_epochs:
            _check_twice_differentiable(module)
        self.adapted_names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.adapted_names:
            raise ValueError("The backbone has no trainable parameters to adapt.")
        self.zeroed_names: list[str] = []
        self.prototype_names: list[str] = []  # head_init="prototypes": the head's parameters, started per task
        if head_init == "prototypes":
            head = Head.of(module)
            if head is None:
                raise ValueError(f"head_init='prototypes' starts the head (the last nn.Linear) at the task's prototypes, "
                                 f"but the adapted {type(module).__name__} has no nn.Linear: give the backbone a linear "
                                 "head (e.g. Conv4(out_features=N)).")
            if head.bias is None:
                raise ValueError("head_init='prototypes' sets the head's bias to -|c_k|^2, but the head (the last "
                                 "nn.Linear) has no bias: build it with bias=True.")
            self.prototype_names = [head.weight, head.bias]
            self.adapted_names += [n for n in self.prototype_names if n not in self.adapted_names]
            for name in self.prototype_names:  # unused: never trained, never seen by an optimizer or DDP
                module.get_parameter(name).requires_grad_(False)
        if zero_head:
            heads = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            if not heads:
                raise ValueError(f"zero_head=True starts the head (the last nn.Linear) at zero, but the adapted "
                                 f"{type(module).__name__} has no nn.Linear.")
            prefix = f"{heads[-1]}." if heads[-1] else ""
            for name, p in module.get_submodule(heads[-1]).named_parameters(recurse=False):
                if f"{prefix}{name}" in self.adapted_names:  # not trained: every task starts it at zero
                    self.zeroed_names.append(f"{prefix}{name}")
                    p.detach().zero_()
                    p.requires_grad_(False)
        self.engine = MetaBatchEngine(task_parallel, task_chunk, batch_norm)
        self._probed: dict[tuple, tuple[tuple[int, ...], bool]] = {}  # see probe_outputs
        self.inner_lrs = nn.ParameterDict()
        if learn_inner_lr or per_step_lr or self.meta_sgd:
            for name, p in module.named_parameters():
                if name in self.adapted_names:  # Meta-SGD: [steps,] + the parameter's shape; else [steps or 1]
                    steps_dim = (inner_steps,) if per_step_lr else ()
                    shape = (*steps_dim, *p.shape) if self.meta_sgd else (steps_dim or (1,))
                    self.inner_lrs[name.replace(".", "__")] = nn.Parameter(torch.full(shape, float(inner_lr)))

    # ------------------------------------------------------------------ what adapts, at which rates
    def adapted_module(self) -> nn.Module:
        """The module whose parameters the inner loop adapts (ANIL: the head)."""
        return self.backbone

    def adapted_params(self) -> Params:
        """The initialization every task adapts from (``zero_head``: the head as fresh zeros, which the inner loop
        differentiates but the outer loop does not train; ``head_init="prototypes"``: the head's frozen parameters,
        which the engine replaces by each task's start)."""
        return {n: torch.zeros_like(p).requires_grad_() if n in self.zeroed_names else p
                for n, p in self.adapted_module().named_parameters() if n in self.adapted_names}

    def encode(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs of the adapted module for each task's support and queries ``[B, n, ...]`` (MAML: the inputs)."""
        return support_x, query_x

    def inner_rates(self, step: int) -> dict[str, Tensor | float]:
        """The inner learning rate of each adapted parameter at inner step ``step`` (a float, a learned scalar, or
        with :class:`MetaSGD` a tensor shaped like the parameter)."""
        if not len(self.inner_lrs):
            return dict.fromkeys(self.adapted_names, float(self.hparams.inner_lr))
        if self.hparams.per_step_lr and step >= self.hparams.inner_steps:
            raise ValueError(f"per_step_lr=True learned rates for {self.hparams.inner_steps} inner steps; step "
                             f"{step + 1} has none: adapt for at most inner_steps={self.hparams.inner_steps} steps.")
        rates = {n: self.inner_lrs[n.replace(".", "__")] for n in self.adapted_names}
        if self.hparams.per_step_lr:
            return {n: lr[step] for n, lr in rates.items()}
        return rates if self.meta_sgd else {n: lr[0] for n, lr in rates.items()}

    def no_weight_decay(self) -> list[nn.Parameter]:
        return list(self.inner_lrs.parameters())

    @property
    def batch_norm(self) -> str:
        """How queries are normalised (``"support"`` or ``"transductive"``); settable, e.g. to evaluate a trained
        learner both ways."""
        return self.engine.batch_norm

    @batch_norm.setter
    def batch_norm(self, mode: str) -> None:
        check_choice("batch_norm", mode, BATCH_NORM)
        self.engine.batch_norm = self.hparams.batch_norm = mode

    @property
    def use_vmap(self) -> bool:
        """Whether the tasks of a meta-batch run under one ``vmap`` on this learner's device (else a loop)."""
        return self.engine.use_vmap(self.adapted_module(), self.device)

    @property
    def streams(self) -> bool:
        """Whether training takes meta-gradients chunk by chunk (peak memory of one chunk's graph): the tasks are
        independent given the initialization, so the sum of their meta-gradients is the meta-batch's."""
        return bool(self.hparams.stream_meta_gradients) and self.engine.streams(self.adapted_module(), self.device)

    # ------------------------------------------------------------------ precision and schedule
    @property
    def inner_scale(self) -> float:
        """The inner loop's loss scale: the configured one, else 1024 under float16 precision, else 1."""
        if self.hparams.inner_loss_scale is not None:
            return float(self.hparams.inner_loss_scale)
        return 1024.0 if trainer_view.precision(self._trainer).startswith("16") else 1.0

    @property
    def meta_gradient_scale(self) -> float:
        """The scale of streamed meta-gradients: the gradient scaler's under 16-mixed (what Lightning's backward
        would be scaled by), else the inner loop's."""
        scaler = trainer_view.gradient_scaler(self._trainer)
        return float(scaler.get_scale()) if scaler is not None else self.inner_scale

    def first_order_now(self) -> bool:
        epoch = self.current_epoch if self._trainer is not None else 0
        return self.hparams.first_order or epoch < self.hparams.first_order_epochs

    def msl_weights(self) -> Tensor:
        """MAML++ multi-step loss weights for the current epoch (:func:`~lightning_meta.functional.msl_weights`)."""
        epoch = self.current_epoch if self._trainer is not None else 0
        return msl_weights(self.hparams.inner_steps, self.hparams.msl_epochs, epoch)

    # ------------------------------------------------------------------ a meta-batch
    def task_meta_losses(self, outputs: Tensor, query_y: Union[Tensor, RaggedEpisode]) -> Tensor:
        """Each task's term of the meta-loss ``[B]`` from its query outputs per step ``[B, T, M, ...]``: the last
        step's loss, or with ``multi_step_loss`` the MSL-weighted sum over steps. ``query_y``: the targets ``[B, M,
        ...]``, or the :class:`~lightning_meta.RaggedEpisode` whose padded outputs ``[B, T, M_max, N_max]`` these are
        (each task's loss then from its own queries and classes)."""
        def losses(out: Tensor) -> Tensor:
            if isinstance(query_y, RaggedEpisode):
                return query_y.task_losses(out)
            return per_task_loss(out, query_y, target_ndim(query_y, 1))

        if outputs.shape[1] == 1:
            return losses(outputs[:, 0])
        per_step = torch.stack([losses(outputs[:, t]) for t in range(outputs.shape[1])], 1)
        return (self.msl_weights().to(per_step) * per_step).sum(1)

    def run_meta_batch(self, batch: Batch, training: bool, stream: bool = False, trajectory: Optional[str] = None,
                       steps: Optional[int] = None) -> tuple[Adapted, Optional[Streamed]]:
        """Adapt to every task of ``batch`` (training: ``inner_steps``, second order unless first order; else
        ``eval_inner_steps`` or ``steps``, first order, detached) and predict its queries. Diverged tasks get NaN
        outputs: in evaluation they are counted and left out; in training with ``nonfinite="skip"`` the meta-batch.
        A :class:`~lightning_meta.RaggedEpisode` runs as groups of tasks of one shape
        (:meth:`~lightning_meta.functional.MetaBatchEngine.run_groups`), each task on the head's first ``N_i``
        outputs; its outputs are ``[B, T, M_max, N_max]``, ``-inf`` outside each task's own cells."""
        multi = training and self.hparams.multi_step_loss
        ragged = batch if isinstance(batch, RaggedEpisode) else None
        compiled = self.compiled if self.compiler is not None else None
        if ragged is not None and compiled is not None:  # a static-shape graph per task shape: never pays off
            eager_for_ragged(self, "inner loop")
            compiled = None
        with self.gradients_enabled() as cloned:
            groups, n_way = self.task_groups(batch, training, cloned)
            per_task = [t.query_y for t in ragged.tasks()] if ragged is not None else []

            def query_targets(tasks: list[int]) -> Tensor:
                return torch.stack([per_task[t] for t in tasks]) if ragged is not None else batch.query_y[tasks]

            def share(tasks: list[int], out: Tensor) -> Tensor:
                return self.task_meta_losses(out, query_targets(tasks)).sum() / batch.num_tasks

            adapted, streamed = self.engine.run_groups(
                self.adapted_module(), self.adapted_params(), self.inner_rates, groups,
                self.hparams.inner_steps if training else steps or self.eval_inner_steps,
                first_order=not training or self.first_order_now(), loss_scale=self.inner_scale,
                trajectory=trajectory or ("all" if multi else "last"), share=share if stream else None,
                leaves=[p for p in self.parameters() if p.requires_grad], outer_scale=self.meta_gradient_scale,
                compiled=compiled, head_init=self.hparams.head_init)
            if ragged is None:
                self.check_outputs(adapted.outputs[:, 0], batch.support_y, n_way)
            dropped = self.check_inner_loop(adapted, evaluating=not training)
            if dropped is not None:
                mask = dropped.view(-1, *[1] * (adapted.outputs.dim() - 1))
                if ragged is not None:  # the task's own cells; the others stay -inf
                    mask = mask & (ragged.mask()[:, None, :, None] & ragged.way_mask()[:, None, None, :])
                adapted.outputs, streamed = adapted.outputs.detach().masked_fill(mask, float("nan")), None
        if not training:
            adapted.outputs = adapted.outputs.detach()
        return adapted, streamed

    def task_groups(self, batch: Batch, training: bool, cloned: bool = False) -> tuple[list[TaskGroup], Optional[int]]:
        """The meta-batch as groups of tasks of one shape, their inputs encoded (:meth:`encode`; detached in
        evaluation; ``cloned``: copies first, out of inference mode), and each group's width of the head
        (:meth:`head_ways`); with the episodes' number of ways (``None`` for regression; the most of a task for a
        ragged meta-batch). A fixed :class:`~lightning_meta.Episode` is one group."""

        def encoded(sx: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
            if cloned:  # inference tensors cannot enter autograd: take normal copies
                sx, qx = sx.clone(), qx.clone()
            sx, qx = self.encode(sx, qx)
            return (sx, qx) if training else (sx.detach(), qx.detach())

        if not isinstance(batch, RaggedEpisode):
            sx, sy, qx, _ = batch
            sy = sy.clone() if cloned else sy
            sx, qx = encoded(sx, qx)
            n_way = None if sy.is_floating_point() else int(sy.max()) + 1  # one synchronisation for both checks
            narrow = self.head_ways(sx, sy, n_way, varying=self.hparams.variable_ways)
            return [TaskGroup(list(range(sx.shape[0])), sx, sy, qx, narrow)], n_way
        groups = []
        for tasks in batch.shape_groups():
            sx, sy, qx, _ = batch.stack(tasks)
            sx, qx = encoded(sx, qx)
            groups.append(TaskGroup(tasks, sx, sy, qx, batch.ways[tasks[0]]))
        width = self.variable_head_width(groups[0].support_x, f"A ragged meta-batch of up to {batch.num_ways} ways")
        wider = next((i for i, ways in enumerate(batch.ways) if ways > width), None)
        if wider is not None:
            raise ValueError(
                f"Task {wider} of the ragged meta-batch has {batch.ways[wider]} ways but the model's head has {width} "
                f"outputs: build the backbone with as many outputs as the most ways of an episode (max_way), e.g. "
                f"Conv4(out_features={batch.num_ways}) or MLP(..., out_features={batch.num_ways}).")
        n, wide = batch.ways[0], self.hparams.variable_ways or self.hparams.allow_wider_head
        if len(set(batch.ways)) == 1 and n < width and not wide:  # ways fixed (only shots vary): one head width
            raise ValueError(
                f"This is a {n}-way episode but the model's head has {width} outputs: build the backbone with {n} "
                f"outputs (e.g. Conv4(out_features={n})), or pass variable_ways=True for a head of max_way outputs that "
                "serves episodes of varying way (set by itself when the data module draws the ways).")
        for group in groups:  # the whole head where a task has as many ways as it has outputs
            group.n_way = group.n_way if group.n_way is not None and group.n_way < width else None
        return groups, batch.num_ways

    def training_step(self, batch: Batch, batch_idx: int) -> Optional[Tensor]:
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        adapted, streamed = self.run_meta_batch(batch, training=True, stream=self.streams)
        targets = batch if isinstance(batch, RaggedEpisode) else batch.query_y
        loss = streamed.loss() if streamed is not None else self.task_meta_losses(adapted.outputs, targets).mean()
        return self.finish_training_step(batch, self._last_outputs(adapted, batch), loss)

    def forward_episode(self, batch: Batch) -> Tensor:
        """Query outputs of the meta-batch: ``[B, M, N]`` logits, or shaped like ``query_y``; for a
        :class:`~lightning_meta.RaggedEpisode` ``[B, M_max, N_max]``, ``-inf`` outside each task's own cells."""
        adapted, _ = self.run_meta_batch(batch, training=self.training, trajectory="last")
        return self._last_outputs(adapted, batch)

    @staticmethod
    def _last_outputs(adapted: Adapted, batch: Batch) -> Tensor:
        last = adapted.outputs[:, -1]
        return last if isinstance(batch, RaggedEpisode) else like_targets(last, batch.query_y)

    def step_outputs(self, batch: Batch, steps: Optional[int] = None) -> Tensor:
        """Query outputs after 0, 1, ..., ``steps`` inner steps (default ``eval_inner_steps``): ``[B, steps+1, M, ...]``
        (a :class:`~lightning_meta.RaggedEpisode`: ``[B, steps+1, M_max, N_max]``, padded with ``-inf``). Used by
        :class:`~lightning_meta.callbacks.AdaptationCurve`; no gradients flow out."""
        return self.run_meta_batch(batch, training=False, trajectory="all_and_initial", steps=steps)[0].outputs

    @property
    def eval_inner_steps(self) -> int:
        return self.hparams.eval_inner_steps or self.hparams.inner_steps

    def check_inner_loop(self, adapted: Adapted, evaluating: bool = False) -> Optional[Tensor]:
        """Raise naming the first non-finite inner step and task. Returns the tasks ``[B]`` to drop instead: the
        diverged ones in evaluation, or all of them with ``nonfinite="skip"`` in training (the query outputs may
        still be finite, e.g. a -inf bias behind a ReLU: never train on them)."""
        bad = (~torch.isfinite(adapted.losses.detach())) | (~adapted.finite)
        if not bad.any():
            return None
        if evaluating:
            return bad.any(1)
        if self.hparams.nonfinite == "skip" and self.training:
            return torch.ones_like(bad[:, 0])
        task, step = (int(i) for i in bad.nonzero()[0])
        raise FloatingPointError(
            f"MAML inner loop: the support loss, its gradient or the adapted parameters became non-finite at inner "
            f"step {step} of task {task} in the meta-batch (loss {adapted.losses[task, step].item()}). Lower "
            "`inner_lr`, use `inner_loss_scale` under float16, or check the inputs."
        )

    # ------------------------------------------------------------------ the head against the episodes
    def probe_outputs(self, support_x: Tensor) -> tuple[tuple[int, ...], bool]:
        """The adapted module's output shape per example for support inputs like ``support_x [B, n, ...]``, and
        whether its head (the last ``nn.Linear``) produces those outputs: one forward of one example (twice, for
        batch norm), without gradients, in evaluation mode, random streams untouched; once per kind of input."""
        key = (tuple(support_x.shape[2:]), support_x.dtype, support_x.device)
        if key not in self._probed:
            module = self.adapted_module()
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            example = support_x[0, :1].expand(2, *support_x.shape[2:])
            devices = [example.device] if example.device.type == "cuda" else []
            seen: list[Any] = []
            handle = linears[-1].register_forward_hook(lambda m, args, out: seen.append(out)) if linears else None
            try:
                with torch.no_grad(), self.mode(training=False), torch.random.fork_rng(devices=devices):
                    out = module(example)
            finally:
                if handle is not None:
                    handle.remove()
            head_is_output = (bool(seen) and isinstance(out, Tensor) and isinstance(seen[-1], Tensor)
                              and seen[-1].shape == out.shape and torch.equal(seen[-1], out))
            self._probed[key] = (tuple(out.shape[1:]), head_is_output)
        return self._probed[key]

    def head_ways(self, support_x: Tensor, support_y: Tensor, n_way: Optional[int], varying: bool) -> Optional[int]:
        """Check the head against episodes of ``n_way`` classes (``None``: regression) with support inputs
        ``support_x [B, n, ...]`` (encoded) before the inner loop runs, and return how many of its outputs the tasks
        use (``None``: all). Episodes of varying way (``varying``) and Proto-MAML use the head's first ``n_way``;
        otherwise the head must have ``n_way`` outputs (more with ``allow_wider_head``)."""
        shape, _ = self.probe_outputs(support_x)
        prototypes = self.hparams.head_init == "prototypes"
        if n_way is None or not (varying or prototypes):
            if prototypes:
                raise ValueError("head_init='prototypes' starts the head from the support set's class prototypes: it "
                                 "needs classification episodes (integer labels), but these have float targets.")
            self._check_width(shape, support_y, n_way)
            return None
        why = "Proto-MAML (head_init='prototypes')" if prototypes else "Episodes of varying way (variable_ways=True)"
        width = self.variable_head_width(support_x, why)
        if n_way > width:
            self._check_width(shape, support_y, n_way)  # names the episode's way and the fix
        return n_way if n_way < width else None

    def variable_head_width(self, support_x: Tensor, why: str) -> int:
        """The head's number of outputs, after checking that the head (the last ``nn.Linear`` of the adapted module)
        is its output layer, which a task of ``N`` classes uses the first ``N`` outputs of (``why``: who needs it)."""
        shape, head_is_output = self.probe_outputs(support_x)
        if len(shape) != 1 or not head_is_output:
            module = self.adapted_module()
            raise ValueError(
                f"{why} use each task's first N outputs of the head, the last nn.Linear of the adapted "
                f"{type(module).__name__}, but its outputs (shape {list(shape)} per example) are not that layer's: make "
                "the last nn.Linear the output layer, with max_way outputs (e.g. Conv4(out_features=max_way)).")
        return shape[0]

    def check_outputs(self, outputs: Tensor, support_y: Tensor, n_way: Optional[int]) -> None:
        """The backbone's outputs ``[B, M, ...]`` fit the episodes' targets ``[B, n, ...]``: ``n_way`` logits for
        classification (more only with ``allow_wider_head``), one output per target value for regression
        (``n_way=None``)."""
        self._check_width(tuple(outputs.shape[2:]), support_y, n_way)

    def _check_width(self, width: tuple[int, ...], support_y: Tensor, n_way: Optional[int]) -> None:
        if support_y.is_floating_point():
            size = tuple(support_y.shape[2:])
            if width != size and not (not size and width == (1,)):
                want = size[0] if len(size) == 1 else (size or 1)
                raise ValueError(f"This regression episode has targets of size {want} per example but the model's head "
                                 f"has {width[-1] if len(width) == 1 else width} outputs: build the backbone with "
                                 f"out_features={want}.")
            return
        if n_way is None:
            raise ValueError("check_outputs needs the episode's number of classes (n_way) for class labels.")
        heads = width[-1] if len(width) == 1 else None
        if heads is None or heads < n_way or (heads > n_way and not self.hparams.allow_wider_head):
            got = f"{heads} outputs" if heads is not None else f"outputs of shape {width} per example"
            raise ValueError(
                f"This is a {n_way}-way episode but the model's head has {got}: build the backbone with "
                f"{n_way} outputs (e.g. Conv4(out_features={n_way}) or MLP(..., out_features={n_way})), or sample "
                f"{heads if heads is not None else 'matching'}-way episodes"
                + (", or pass allow_wider_head=True to train a wider head on fewer classes (variable_ways=True for "
                   "episodes of varying way: each task uses the head's first N outputs)." if heads and heads > n_way
                   else "."))

    @override
    def setup(self, stage: str) -> None:
        """Besides :meth:`MetaLearner.setup`: a trainer's data module with ``variable_episodes`` (episodes of up to
        ``max_way`` classes) sets ``variable_ways``, and a head narrower than ``max_way`` is refused now."""
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None)
        max_way = getattr(getattr(datamodule, "variable_episodes", None), "max_way", None)
        fixed = {name: getattr(datamodule, name, None) for name in ("n_way", "train_way")}  # a number fixes a stream's
        if max_way is None or None not in fixed.values():  # ways fixed (only shots or queries vary): one head width
            return
        self.hparams.variable_ways = True
        most = max([w for w in fixed.values() if isinstance(w, int)] + ([max_way] if None in fixed.values() else []))
        measured = [w for w in getattr(self, "_data_widths", {}).values() if w > 0]  # the backbone's outputs
        head = Head.of(self.backbone)
        width = measured[0] if measured else head.out_features if head is not None else None
        if width is not None and width < most:
            raise ValueError(
                f"The data module's variable episodes have up to {most} ways (max_way={max_way}"
                + "".join(f", {k}={v}" for k, v in fixed.items() if isinstance(v, int))
                + f"), but the model's head has {width} outputs: build the backbone with out_features={most} (e.g. "
                f"Conv4(out_features={most}) or MLP(..., out_features={most})); each task uses the head's first N "
                "outputs.")

    # ------------------------------------------------------------------ one new task
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        batch, n_way = self._single_task(support_x, support_y)
        sy = batch.support_y[0]
        raw = batch.support_x
        classes = None if sy.is_floating_point() else n_way
        with self.gradients_enabled(), self.mode(training=False):  # as validation adapts: dropout off
            sx = self.encode(raw.clone(), raw[:, :0].clone())[0][0].detach()
            narrow = self.head_ways(sx[None], sy[None], classes, varying=self.hparams.variable_ways)
            path, losses, finite = self.engine.adapt(self.adapted_module(), self.adapted_params(), self.inner_rates, sx,
                                                     sy.clone(), self.eval_inner_steps, self.inner_scale, n_way=narrow,
                                                     head_init=self.hparams.head_init)
        self.check_inner_loop(Adapted(torch.empty(0), losses[None].detach(), finite[None]))
        adapted = {k: v.detach() for k, v in path[-1].items()}

        def predict(query_x: Tensor) -> Tensor:
            with self.evaluating():
                support, x = (t[0] for t in self.encode(raw, self.as_inputs(query_x, "query_x")[None]))
                out = self.engine.predict(self.adapted_module(), adapted, support, x)
                self.check_outputs(out[None], sy[None], classes)
                return like_targets(out, sy[:1].expand(x.shape[0], *sy.shape[1:]))

        return TaskPredictor(predict, n_way)


def _check_twice_differentiable(module: nn.Module) -> None:
    """Second-order MAML differentiates the inner loop's gradient again. Fused attention kernels (timm's ``Attention``
    with ``fused_attn=True``, i.e. ``F.scaled_dot_product_attention``'s flash/efficient kernels) have no second
    derivative: refuse them here, with the fixes, instead of failing in the first backward."""
    fused = [name for name, m in module.named_modules() if getattr(m, "fused_attn", False) is True]
    if fused:
        raise ValueError(
            f"The adapted network has fused attention ({fused[0]}{' and others' if len(fused) > 1 else ''}: "
            "F.scaled_dot_product_attention), which has no second derivative, so the second-order meta-gradient "
            "cannot be taken. Use first_order=True, or switch fused attention off before training: "
            "for m in backbone.modules(): m.fused_attn = False (timm; the same attention, computed step by step)."
        )
