"""MAML (Finn, Abbeel & Levine, ICML 2017) and its variants: first-order MAML, ANIL (Raghu et al. 2020), Meta-SGD
(Li et al. 2017) and the MAML++ options of Antoniou et al. (2019)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_meta._checks import check_int, check_positive
from lightning_meta.data.episode import Episode
from lightning_meta.functional.batched import batched_chain, batched_chain_grads
from lightning_meta.functional.episode import per_task_loss, target_ndim
from lightning_meta.functional.inner_loop import functional_forward, inner_adapt, inner_adapt_batched
from lightning_meta.learners.base import MetaLearner, TaskPredictor

TASK_PARALLEL = ("auto", "vmap", "loop")


def _disable_running_stats(module: nn.Module) -> None:
    """Batch norm uses each forward pass's own statistics (per task, as in Finn et al.'s reference code)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


def _autocast_enabled() -> bool:
    try:
        return any(torch.is_autocast_enabled(device) for device in ("cuda", "cpu"))
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _norm_input_in_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    weight = module.weight if module.weight is not None else torch.empty(0)
    return (args[0].to(weight.dtype),) + tuple(args[1:])


@contextlib.contextmanager
def _norms_in_float32(norms: list[nn.Module]):
    """Under autocast, the batch norms ``norms`` of the inner loop take their input in their weights' dtype (float32):
    batch norm's double backward (second-order MAML) returns NaN for float16 inputs, and its batching rule under
    ``vmap`` rejects a reduced-precision input with float32 weights. Convolutions and matmuls stay reduced."""
    if not norms or not _autocast_enabled():
        yield
        return
    handles = [m.register_forward_pre_hook(_norm_input_in_weight_dtype) for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _WithGradients(torch.autograd.Function):
    """``value`` as a loss whose gradient with respect to each of ``leaves`` is the given one (times the incoming
    gradient, e.g. an AMP scale): the meta-loss of tasks whose gradients were already taken one by one. A custom
    backward rather than ``value + ((p - p.detach()) * g).sum()``: an infinite ``g`` (float16 overflow, which the
    gradient scaler must see and skip) would make that sum's value NaN."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: list, *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *(grad_output.to(g.dtype) * g for g in ctx.grads))


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning: adapt all parameters by ``inner_steps`` gradient steps on each task's support set
    and update the initialization through those steps (second order, or first order by flag).

    The inner loop is a pure function of (params, support) on ``torch.func`` (no module cloning): a meta-batch runs as
    one ``vmap`` over its tasks or as a loop (``task_parallel="auto"`` picks ``vmap`` on a GPU, and on a CPU for
    networks without convolutions: see :attr:`use_vmap`). Inner gradients never touch ``.grad``, so no DDP hook fires inside the
    inner loop; Lightning owns the outer backward, gradient scaling, clipping and DDP synchronisation. In training
    each task's (or ``task_chunk``'s) meta-gradient is taken as soon as it is done and its graph freed, so peak
    memory is one task's graph on the loop (:meth:`_streams`).

    Batch norm: running statistics are turned off on the backbone; every forward pass (each task's support set, each
    query set) normalises with its own batch statistics, in training and evaluation alike, as in the paper's code.
    Under mixed precision it runs in float32 inside the inner loop (its float16 double backward gives NaN).

    Validation and testing adapt with gradients even under Lightning's default ``inference_mode=True``.

    Args:
        backbone: network whose outputs are the N-way logits (``Conv4(out_features=N)``) or regression outputs.
        inner_lr: inner-loop step size (the initial value when learned).
        inner_steps: inner steps while meta-training.
        eval_inner_steps: inner steps in validation, testing and :meth:`adapt` (default: ``inner_steps``).
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: learn one inner rate per parameter tensor (per layer).
        per_step_lr: MAML++ LSLR: learn one rate per parameter tensor and per inner step.
        multi_step_loss: MAML++ MSL: the meta-loss weighs the query loss after every inner step, annealed to the last
            step over ``msl_epochs`` epochs.
        first_order_epochs: MAML++ derivative-order annealing: first order for the first epochs, then second.
        task_parallel: ``"auto"``, ``"vmap"`` or ``"loop"``.
        task_chunk: tasks whose meta-gradient is taken together in training, as soon as they are done, their graph
            then freed: peak memory is that of ``task_chunk`` tasks (see :meth:`_streams`). With ``vmap`` they run
            in one vmapped call (``None``: the whole meta-batch); on the loop ``None`` means one task at a time, which
            costs small networks one extra autograd call per task (sinusoid MLP: ``task_chunk=25`` is faster).
        inner_loss_scale: loss scale of the inner loop (``None``: 1024 under float16 precision, else 1), so small
            inner gradients do not underflow in float16.
        **kwargs: optimizer options of :class:`MetaLearner`.

    Example:
        >>> from lightning_meta.models import MLP
        >>> maml = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=1)
        >>> ep = Episode(torch.randn(4, 10, 1), torch.randn(4, 10), torch.randn(4, 10, 1), torch.randn(4, 10))
        >>> maml(ep).shape                # predictions shaped like the targets
        torch.Size([4, 10])
        >>> maml.adapt(ep.support_x[0], ep.support_y[0])(torch.randn(3, 1)).shape
        torch.Size([3])
    """

    adapt_head_only = False
    meta_sgd = False

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: Optional[int] = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        per_step_lr: bool = False,
        multi_step_loss: bool = False,
        msl_epochs: int = 10,
        first_order_epochs: int = 0,
        task_parallel: str = "auto",
        task_chunk: Optional[int] = None,
        inner_loss_scale: Optional[float] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        lr_scheduler: Optional[str] = None,
        lr_step_epochs: int = 10,
        lr_gamma: float = 0.5,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(lr, weight_decay, optimizer, lr_scheduler, lr_step_epochs, lr_gamma, nonfinite)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        check_positive("inner_lr", inner_lr)
        check_int("inner_steps", inner_steps, 1)
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        check_int("eval_inner_steps", eval_inner_steps, 1)
        check_int("msl_epochs", msl_epochs, 1)
        check_int("first_order_epochs", first_order_epochs, 0)
        if task_parallel not in TASK_PARALLEL:
            raise ValueError(f"Expected `task_parallel` to be one of {TASK_PARALLEL}, but got {task_parallel!r}.")
        if task_chunk is not None:
            check_int("task_chunk", task_chunk, 1)
        if inner_loss_scale is not None:
            check_positive("inner_loss_scale", inner_loss_scale)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        _disable_running_stats(backbone)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.first_order = first_order
        module = self._adapted_module()
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("The backbone has no trainable parameters to adapt.")
        self._adapted_names = names
        self._forward = functional_forward(module)  # (params, x) -> outputs; shared weights replaced in every use
        self.task_parallel = task_parallel
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
        self._batched_forward = batched_chain(module)  # a fast vmap replacement for linear/activation chains
        self._batched_grads = batched_chain_grads(module) if self._batched_forward is not None else None
        self._norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        learned = learn_inner_lr or per_step_lr or self.meta_sgd
        self.inner_lrs = nn.ParameterDict()
        if learned:
            params = dict(module.named_parameters())
            for n in names:
                if self.meta_sgd:
                    init = torch.full_like(params[n], float(inner_lr))
                else:
                    init = torch.full((inner_steps if per_step_lr else 1,), float(inner_lr))
                self.inner_lrs[n.replace(".", "__")] = nn.Parameter(init)
        self._fixed_lr = None if learned else float(inner_lr)
        linears = [m for m in backbone.modules() if isinstance(m, nn.Linear)]
        self.out_features = linears[-1].out_features if linears else None
        self._step_outputs: Optional[Tensor] = None
        self._stream_next = False  # set by training_step: meta-gradients task by task (see _streams)
        self._streamed = None

    @property
    def use_vmap(self) -> bool:
        """Whether the tasks of a meta-batch run under one ``vmap`` (else a loop). ``auto``: on a GPU always (11.7x
        the loop's speed for Conv4 on an H100, ``benchmarks/bench_gpu.py``); on a CPU only for networks without
        convolutions, whose vmapped form is slower there than a loop. vmap holds more memory: see ``task_chunk``."""
        if self.task_parallel != "auto":
            return self.task_parallel == "vmap"
        return not self._has_conv or self.device.type == "cuda"

    # ------------------------------------------------------------------ pieces ANIL overrides
    def _adapted_module(self) -> nn.Module:
        return self.backbone

    def encode(self, x: Tensor) -> Tensor:
        """Inputs of the adapted module for ``x [B, n, ...]`` (MAML: the inputs themselves)."""
        return x

    # ------------------------------------------------------------------ inner loop
    def _rates(self):
        if self._fixed_lr is not None:
            return lambda s: dict.fromkeys(self._adapted_names, self._fixed_lr)
        def rates(s: int):
            out = {}
            for n in self._adapted_names:
                lr = self.inner_lrs[n.replace(".", "__")]
                out[n] = lr if self.meta_sgd else lr[min(s, lr.shape[0] - 1)]
            return out
        return rates

    def _loss_scale(self) -> float:
        scale = self.hparams.get("inner_loss_scale")
        if scale is not None:
            return float(scale)
        precision = str(getattr(self._trainer, "precision", "32")) if self._trainer is not None else "32"
        return 1024.0 if precision.startswith("16") else 1.0

    def _outer_scale(self) -> float:
        """Loss scale for meta-gradients taken task by task: the trainer's gradient scaler's current scale under
        16-mixed (what the whole-batch backward would be scaled by), else the inner loop's."""
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        return self._loss_scale()

    def _first_order_now(self) -> bool:
        return self.first_order or (
            self._trainer is not None and self.current_epoch < self.hparams.get("first_order_epochs", 0)
        )

    def _run_tasks(self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int, first_order: bool, all_steps: bool,
                   include_initial: bool = False, stream=None):
        """Adapt to every task and predict its queries: ``(outputs [B, T, M, ...], inner losses [B, steps],
        finite steps [B, steps])`` with T = steps when ``all_steps`` else 1 (plus the unadapted prediction first
        when ``include_initial``). ``stream(tasks, outputs [c, T, M, ...]) -> their share of the meta-loss``: each
        task's (loop) or chunk's (vmap with ``task_chunk``) share is differentiated as soon as it is done, its graph
        freed, and the gradients summed in ``self._streamed``; the outputs come back detached (see :meth:`_streams`)."""
        module = self._adapted_module()
        params = {n: p for n, p in module.named_parameters() if n in self._adapted_names}
        rates, scale = self._rates(), self._loss_scale()
        forward = self._forward

        def pick(trajectory):
            chosen = trajectory[1:] if all_steps else trajectory[-1:]
            return trajectory[:1] + chosen if include_initial else chosen

        leaves = [p for p in self.parameters() if p.requires_grad] if stream is not None else []
        total, summed = 0.0, [None] * len(leaves)
        outer = self._outer_scale() if stream is not None else 1.0

        def streamed(idx: slice, out: Tensor) -> Tensor:
            """Differentiate the share of the meta-loss of tasks ``idx`` now, add it up, and let their graph go."""
            nonlocal total
            share = stream(idx, out)
            grads = torch.autograd.grad(share * outer, leaves, allow_unused=True)
            for j, g in enumerate(grads):
                if g is not None:
                    g = g.float() / outer if outer != 1.0 else g
                    summed[j] = g if summed[j] is None else summed[j] + g
            total = total + share.detach()
            return out.detach()

        forward_all = self._batched_forward or torch.func.vmap(forward, randomness="different")
        support_grads = self._batched_grads if self._batched_forward is not None else None

        def run_batched(lo: int, hi: int):
            batched = {n: p.expand(hi - lo, *p.shape) for n, p in params.items()}
            trajectory, losses, finite = inner_adapt_batched(forward_all, batched, sx[lo:hi], sy[lo:hi], steps, rates,
                                                             first_order, scale, support_grads)
            outputs = [forward_all(p, qx[lo:hi]) for p in pick(trajectory)]
            out = outputs[0].unsqueeze(1) if len(outputs) == 1 else torch.stack(outputs, 1)
            return (out if stream is None else streamed(slice(lo, hi), out)), losses, finite

        def run_task(i: int):
            trajectory, losses, finite = inner_adapt(forward, params, sx[i], sy[i], steps, rates, first_order, scale,
                                                     engine="autograd")
            return torch.stack([forward(p, qx[i]) for p in pick(trajectory)]), losses, finite

        def run_loop(lo: int, hi: int):
            out, losses, finite = (torch.stack(r) for r in zip(*[run_task(i) for i in range(lo, hi)]))
            return (out if stream is None else streamed(slice(lo, hi), out)), losses, finite

        with _norms_in_float32(self._norms):
            b = sx.shape[0]
            chunk = self.hparams.get("task_chunk") if stream is not None else b
            run = run_batched if self.use_vmap else run_loop  # vmap: every task (or chunk) at once
            chunk = min(chunk or (b if self.use_vmap else 1), b)
            results = tuple(torch.cat(r) for r in zip(*[run(lo, min(lo + chunk, b)) for lo in range(0, b, chunk)]))
        if stream is not None:
            self._streamed = (total, [(p, g) for p, g in zip(leaves, summed) if g is not None])
        return results

    def _raise_nonfinite(self, losses: Tensor, finite: Tensor, evaluating: bool = False) -> Optional[Tensor]:
        """Raise naming the first non-finite inner step and task. Returns the tasks ``[B]`` to drop instead: every
        diverged task in evaluation (``evaluating``: its outputs become NaN, and the base class counts it as diverged
        and leaves it out of the metrics, so one diverged task does not abort a test run), or, with
        ``nonfinite="skip"`` in training, all of them (the meta-loss becomes NaN, so the meta-batch is skipped)."""
        bad = (~torch.isfinite(losses)) | (~finite)
        if bad.any():
            task, step = (int(i) for i in bad.nonzero()[0])
            if evaluating:
                return bad.any(1)
            if self.hparams.get("nonfinite", "raise") == "skip" and self.training:
                return torch.ones_like(bad[:, 0])  # the query outputs may still be finite (a -inf bias behind a ReLU)
            raise FloatingPointError(
                f"MAML inner loop: the support loss, its gradient or the adapted parameters became non-finite at inner "
                f"step {step} of task {task} in the meta-batch (loss {losses[task, step].item()}). Lower `inner_lr`, "
                "use `inner_loss_scale` under float16, or check the inputs."
            )
        return None

    @contextlib.contextmanager
    def _grad_mode(self):
        """Gradients for the inner loop even inside Lightning's inference mode (validation, testing)."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.enable_grad():
                yield True
        else:
            with torch.enable_grad():
                yield False

    def forward_episode(self, batch: Episode) -> Tensor:
        sx, sy, qx, qy = batch
        training = self.training
        steps = self.inner_steps if training else self.eval_inner_steps
        msl = training and self.hparams.get("multi_step_loss", False)
        stream = None
        if self._stream_next and training and torch.is_grad_enabled():
            weights = self.msl_weights().to(sx.device) if msl else None
            b, ndim = sx.shape[0], target_ndim(qy, 1)

            def stream(idx, out):  # the share of meta_loss of tasks idx (out [c, T, M, ...]): the same terms
                if weights is None:
                    return per_task_loss(out[:, -1], qy[idx], ndim).sum() / b
                per_step = torch.stack([per_task_loss(out[:, t], qy[idx], ndim) for t in range(out.shape[1])], 1)
                return (weights * per_step).sum() / b
        with self._grad_mode() as cloned:
            if cloned:  # inference tensors cannot enter autograd: take normal copies
                sx, sy, qx = sx.clone(), sy.clone(), qx.clone()
            if type(self).encode is not MAML.encode:  # ANIL: the body, support and queries each as adapt() runs it
                sx, qx = self.encode(sx), self.encode(qx)
            if not training:
                sx, qx = sx.detach(), qx.detach()
            outputs, losses, finite = self._run_tasks(
                sx, sy, qx, steps, first_order=not training or self._first_order_now(), all_steps=msl, stream=stream,
            )
            dropped = self._raise_nonfinite(losses.detach(), finite, evaluating=not training)
            if dropped is not None:  # NaN outputs: a skipped meta-batch in training, diverged tasks in evaluation
                outputs = outputs.detach().masked_fill(dropped.view(-1, *[1] * (outputs.dim() - 1)), float("nan"))
                self._streamed = None  # so the meta-loss comes from these outputs: NaN
            if not training:
                outputs = outputs.detach()
        self._step_outputs = outputs if msl else None
        return self._like_targets(outputs[:, -1], qy)  # [B, M, N] logits, or predictions shaped like query_y

    @staticmethod
    def _like_targets(outputs: Tensor, targets: Tensor) -> Tensor:
        """Regression predictions ``[.., M, 1]`` for scalar targets ``[.., M]`` as ``[.., M]``; others unchanged."""
        scalar = targets.is_floating_point() and outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1
        return outputs.squeeze(-1) if scalar else outputs

    def _streams(self) -> bool:
        """Training on the task loop takes each task's meta-gradient as soon as the task is done and frees its graph,
        instead of holding every task's graph until the outer backward. The tasks of a meta-batch are independent
        given the initialization (batch norm statistics are per task too), so the meta-gradient is the sum of the
        per-task ones, second order or first: peak memory is one task's graph, not the meta-batch's, at the same
        arithmetic. The returned meta-loss has exactly the summed gradients (and the value) of the usual one, so
        Lightning's backward, gradient scaling, clipping and DDP synchronisation are unchanged. Not for vmap (all
        tasks run at once) unless ``task_chunk`` splits the meta-batch, ANIL (its body runs before the tasks), or a
        subclass with its own ``meta_loss``."""
        return ((not self.use_vmap or self.hparams.get("task_chunk") is not None) and type(self).encode is MAML.encode
                and type(self).meta_loss is MAML.meta_loss and getattr(self, "_stream", True))

    def training_step(self, batch: Episode, batch_idx: int) -> Optional[Tensor]:
        self._stream_next = self._streams()
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._stream_next, self._streamed = False, None

    def check_episode(self, batch: Episode) -> int:
        n_way = super().check_episode(batch)
        expected = self.out_features
        if expected is not None and not batch.is_regression and expected != n_way:
            raise ValueError(
                f"This is a {n_way}-way episode but the model's head has {expected} outputs: build the backbone with "
                f"out_features={n_way}, or sample {expected}-way episodes."
            )
        size = batch.support_y.shape[2] if batch.support_y.dim() == 3 else 1
        if expected is not None and batch.is_regression and expected != size:
            raise ValueError(
                f"This regression episode has targets of size {size} per example but the model's head has {expected} "
                f"outputs: build the backbone with out_features={size}."
            )
        return n_way

    def no_weight_decay(self) -> list[nn.Parameter]:
        return list(self.inner_lrs.parameters())

    def meta_loss(self, batch: Episode, outputs: Tensor) -> Tensor:
        if self._streamed is not None:  # value and gradients were taken task by task: a loss with that value and
            value, grads = self._streamed  # exactly those gradients
            self._streamed = None
            return _WithGradients.apply(value, [g.to(p.dtype) for p, g in grads], *(p for p, _ in grads))
        if self._step_outputs is None:
            return super().meta_loss(batch, outputs)
        ndim = target_ndim(batch.query_y, 1)
        per_step = torch.stack([per_task_loss(self._step_outputs[:, t], batch.query_y, ndim).mean()
                                for t in range(self._step_outputs.shape[1])])
        return (self.msl_weights().to(per_step) * per_step).sum()

    def msl_weights(self) -> Tensor:
        """MAML++ multi-step loss weights for the current epoch (Antoniou et al. 2019, section 4)."""
        steps, epochs = self.inner_steps, self.hparams.get("msl_epochs", 10)
        epoch = self.current_epoch if self._trainer is not None else 0
        decay = 1.0 / steps / epochs
        floor = 0.03 / steps
        w = torch.full((steps,), max(1.0 / steps - epoch * decay, floor))
        w[-1] = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
        return w

    def step_outputs(self, batch: Episode, steps: Optional[int] = None) -> Tensor:
        """Query outputs after 0, 1, ..., ``steps`` inner steps (default ``eval_inner_steps``): ``[B, steps+1, M, ...]``.
        Used by :class:`~lightning_meta.callbacks.AdaptationCurve`; no gradients flow out."""
        sx, sy, qx, _ = batch
        with self._grad_mode():
            sx, sy, qx = sx.clone(), sy.clone(), qx.clone()
            outputs, _, _ = self._run_tasks(self.encode(sx).detach(), sy, self.encode(qx).detach(),
                                            steps or self.eval_inner_steps, first_order=True, all_steps=True,
                                            include_initial=True)
        return outputs.detach()

    # ------------------------------------------------------------------ one new task
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        batch, n_way = self._single_task(support_x, support_y)
        module = self._adapted_module()
        params = {n: p for n, p in module.named_parameters() if n in self._adapted_names}
        sy = batch.support_y[0]
        with self._grad_mode(), self.mode(training=False):  # as validation adapts: dropout off
            sx = self.encode(batch.support_x.clone())[0].detach()
            trajectory, losses, finite = inner_adapt(self._forward, params, sx, sy.clone(), self.eval_inner_steps,
                                                     self._rates(), True, self._loss_scale())
        self._raise_nonfinite(losses[None].detach(), finite[None])
        adapted = {k: v.detach() for k, v in trajectory[-1].items()}

        def predict(query_x: Tensor) -> Tensor:
            with self.evaluating():
                x = self.encode(self.as_inputs(query_x, "query_x")[None])[0]
                return self._like_targets(self._forward(adapted, x), sy[:1].expand(x.shape[0], *sy.shape[1:]))

        return TaskPredictor(self, predict, n_way)


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., ICLR 2020): adapt only the head; the body runs once per task, never inside
    the inner loop.

    The backbone needs ``forward_features(x)`` and a ``head`` module (as ``Conv4``, ``MLP`` and ``ResNet12`` with
    ``out_features`` have). The body embeds each task's support set, and then its query set, as separate batches
    (batch norm statistics per task and per set, as MAML's own forward passes have them, and exactly as :meth:`adapt`
    runs them, so evaluation measures what deployment gets; all tasks in one ``vmap`` call on a GPU, see
    :meth:`encode`); only ``head`` is adapted, by ``vmap`` over the tasks, and the body's backward runs once for the
    meta-batch.

    Example:
        >>> from lightning_meta.models import MLP
        >>> anil = ANIL(MLP(8, (16,), 3), inner_lr=0.5, inner_steps=2)
        >>> ep = Episode(torch.randn(2, 6, 8), torch.arange(3).repeat(2, 2), torch.randn(2, 3, 8), torch.arange(3).repeat(2, 1))
        >>> anil(ep).shape, anil._adapted_names
        (torch.Size([2, 3, 3]), ['weight', 'bias'])
    """

    adapt_head_only = True

    def __init__(self, backbone: nn.Module, *args, **kwargs) -> None:
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Module) or not callable(getattr(backbone, "forward_features", None)):
            raise ValueError(
                "ANIL adapts only the head: the backbone needs a `head` module and a `forward_features(x)` method "
                "(e.g. Conv4(out_features=N)); got a backbone without them."
            )
        super().__init__(backbone, *args, **kwargs)
        self._body_norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _adapted_module(self) -> nn.Module:
        return self.backbone.head

    def encode(self, x: Tensor) -> Tensor:
        """The body on each task's inputs ``x [B, n, ...]`` -> ``[B, n, D]``, batch norm statistics per task.

        ``task_parallel`` decides here too: ``"vmap"`` runs every task in one vmapped call (a single batched
        convolution per layer), ``"loop"`` one call per task, and ``"auto"`` vmap on a GPU (5.2x learn2learn's ANIL on
        an H100 against 2.2x for the loop, at twice the activation memory) and the loop on a CPU (where the vmapped
        body measured 2.8x slower for Conv4 and per-task activations stay cache-sized). Under autocast batch norm
        runs in float32, as in the inner loop."""
        use_vmap = self.task_parallel == "vmap" or (self.task_parallel == "auto" and x.is_cuda)
        with _norms_in_float32(self._body_norms):
            if not use_vmap:
                return torch.stack([self.backbone.forward_features(task) for task in x])
            return torch.func.vmap(self.backbone.forward_features, randomness="different")(x)


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): learns a step size for every parameter element, initialised to ``inner_lr``.

    Example:
        >>> from lightning_meta.models import MLP
        >>> m = MetaSGD(MLP(1, (4,), 1), inner_lr=0.1)
        >>> sorted(m.inner_lrs.keys()), m.inner_lrs["features__1__weight"].shape
        (['features__1__bias', 'features__1__weight', 'head__bias', 'head__weight'], torch.Size([4, 1]))
    """

    meta_sgd = True
