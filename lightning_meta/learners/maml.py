"""MAML (Finn, Abbeel & Levine, ICML 2017) and its variants: first-order MAML, ANIL (Raghu et al. 2020), Meta-SGD
(Li et al. 2017) and the MAML++ options of Antoniou et al. (2019). How a meta-batch runs (vmap or a loop, chunks,
streamed meta-gradients, loss scales) is :class:`~lightning_meta.functional.MetaBatchEngine`; this file decides
what adapts, at which rates, for how many steps, and what the meta-loss is."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_meta import trainer_view
from lightning_meta._checks import check_choice, check_int, check_positive
from lightning_meta.data.episode import Episode
from lightning_meta.functional.engine import BATCH_NORM, Adapted, MetaBatchEngine, Streamed, batch_norms
from lightning_meta.functional.episode import like_targets, msl_weights, per_task_loss, target_ndim
from lightning_meta.functional.inner_loop import Params
from lightning_meta.learners.base import MetaLearner, TaskPredictor


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
            wider classifier without a word); ``True`` allows it, e.g. one head for episodes of varying way (the
            outputs past the episode's classes are then trained as classes that never appear).
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

    meta_sgd = False  # MetaSGD: one learned rate per parameter element

    def __init__(self, backbone: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1,
                 eval_inner_steps: Optional[int] = None, first_order: bool = False, learn_inner_lr: bool = False,
                 per_step_lr: bool = False, multi_step_loss: bool = False, msl_epochs: int = 10,
                 first_order_epochs: int = 0, task_parallel: str = "auto", task_chunk: Optional[int] = None,
                 stream_meta_gradients: bool = True, inner_loss_scale: Optional[float] = None,
                 batch_norm: str = "support", zero_head: bool = False, allow_wider_head: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        check_positive("inner_lr", inner_lr)
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
        self._checked_widths: set = set()  # kinds of episode whose output width check_output_width has seen
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
        differentiates but the outer loop does not train)."""
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
    def task_meta_losses(self, outputs: Tensor, query_y: Tensor) -> Tensor:
        """Each task's term of the meta-loss ``[B]`` from its query outputs per step ``[B, T, M, ...]``: the last
        step's loss, or with ``multi_step_loss`` the MSL-weighted sum over steps."""
        ndim = target_ndim(query_y, 1)
        if outputs.shape[1] == 1:
            return per_task_loss(outputs[:, 0], query_y, ndim)
        per_step = torch.stack([per_task_loss(outputs[:, t], query_y, ndim) for t in range(outputs.shape[1])], 1)
        return (self.msl_weights().to(per_step) * per_step).sum(1)

    def run_meta_batch(self, batch: Episode, training: bool, stream: bool = False, trajectory: Optional[str] = None,
                       steps: Optional[int] = None) -> tuple[Adapted, Optional[Streamed]]:
        """Adapt to every task of ``batch`` (training: ``inner_steps``, second order unless first order; else
        ``eval_inner_steps`` or ``steps``, first order, detached) and predict its queries. Diverged tasks get NaN
        outputs: in evaluation they are counted and left out; in training with ``nonfinite="skip"`` the meta-batch."""
        sx, sy, qx, qy = batch
        multi = training and self.hparams.multi_step_loss
        with self.gradients_enabled() as cloned:
            if cloned:  # inference tensors cannot enter autograd: take normal copies
                sx, sy, qx = sx.clone(), sy.clone(), qx.clone()
            sx, qx = self.encode(sx, qx)
            if not training:
                sx, qx = sx.detach(), qx.detach()
            n_way = None if sy.is_floating_point() else int(sy.max()) + 1  # one synchronisation for both checks
            self.check_output_width(sx, sy, n_way)
            share = (lambda tasks, out: self.task_meta_losses(out, qy[tasks]).sum() / qy.shape[0]) if stream else None
            adapted, streamed = self.engine.run(
                self.adapted_module(), self.adapted_params(), self.inner_rates, sx, sy, qx,
                self.hparams.inner_steps if training else steps or self.eval_inner_steps,
                first_order=not training or self.first_order_now(), loss_scale=self.inner_scale,
                trajectory=trajectory or ("all" if multi else "last"), share=share,
                leaves=[p for p in self.parameters() if p.requires_grad], outer_scale=self.meta_gradient_scale,
                compiled=self.compiled if self.compiler is not None else None)
            self.check_outputs(adapted.outputs[:, 0], batch.support_y, n_way)
            dropped = self.check_inner_loop(adapted, evaluating=not training)
            if dropped is not None:
                mask = dropped.view(-1, *[1] * (adapted.outputs.dim() - 1))
                adapted.outputs, streamed = adapted.outputs.detach().masked_fill(mask, float("nan")), None
        if not training:
            adapted.outputs = adapted.outputs.detach()
        return adapted, streamed

    def training_step(self, batch: Episode, batch_idx: int) -> Optional[Tensor]:
        batch = self.prepare_episode(batch)
        self.check_episode(batch)
        adapted, streamed = self.run_meta_batch(batch, training=True, stream=self.streams)
        loss = streamed.loss() if streamed is not None else self.task_meta_losses(adapted.outputs, batch.query_y).mean()
        return self.finish_training_step(batch, like_targets(adapted.outputs[:, -1], batch.query_y), loss)

    def forward_episode(self, batch: Episode) -> Tensor:
        adapted, _ = self.run_meta_batch(batch, training=self.training, trajectory="last")
        return like_targets(adapted.outputs[:, -1], batch.query_y)  # [B, M, N] logits, or shaped like query_y

    def step_outputs(self, batch: Episode, steps: Optional[int] = None) -> Tensor:
        """Query outputs after 0, 1, ..., ``steps`` inner steps (default ``eval_inner_steps``): ``[B, steps+1, M, ...]``.
        Used by :class:`~lightning_meta.callbacks.AdaptationCurve`; no gradients flow out."""
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

    def check_output_width(self, support_x: Tensor, support_y: Tensor, n_way: Optional[int]) -> None:
        """:meth:`check_outputs` before the inner loop runs, once per kind of episode: the adapted module on one
        support example (twice, for batch norm), without gradients, in evaluation mode, random streams untouched."""
        key = (tuple(support_x.shape[2:]), support_x.dtype, tuple(support_y.shape[2:]), n_way)
        if key in self._checked_widths:
            return
        example = support_x[0, :1].expand(2, *support_x.shape[2:])
        devices = [example.device] if example.device.type == "cuda" else []
        with torch.no_grad(), self.mode(training=False), torch.random.fork_rng(devices=devices):
            out = self.adapted_module()(example)
        self.check_outputs(out[None], support_y, n_way)
        self._checked_widths.add(key)

    def check_outputs(self, outputs: Tensor, support_y: Tensor, n_way: Optional[int]) -> None:
        """The backbone's outputs ``[B, M, ...]`` fit the episodes' targets ``[B, n, ...]``: ``n_way`` logits for
        classification (more only with ``allow_wider_head``), one output per target value for regression
        (``n_way=None``)."""
        width = tuple(outputs.shape[2:])
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
                + (", or pass allow_wider_head=True to train a wider head on fewer classes." if heads and heads > n_way
                   else "."))

    # ------------------------------------------------------------------ one new task
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        batch, n_way = self._single_task(support_x, support_y)
        sy = batch.support_y[0]
        raw = batch.support_x
        with self.gradients_enabled(), self.mode(training=False):  # as validation adapts: dropout off
            sx = self.encode(raw.clone(), raw[:, :0].clone())[0][0].detach()
            path, losses, finite = self.engine.adapt(self.adapted_module(), self.adapted_params(), self.inner_rates, sx,
                                                     sy.clone(), self.eval_inner_steps, self.inner_scale)
        self.check_inner_loop(Adapted(torch.empty(0), losses[None].detach(), finite[None]))
        adapted = {k: v.detach() for k, v in path[-1].items()}

        def predict(query_x: Tensor) -> Tensor:
            with self.evaluating():
                support, x = (t[0] for t in self.encode(raw, self.as_inputs(query_x, "query_x")[None]))
                out = self.engine.predict(self.adapted_module(), adapted, support, x)
                self.check_outputs(out[None], sy[None], None if sy.is_floating_point() else n_way)
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
