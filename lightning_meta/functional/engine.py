"""How a meta-batch of MAML tasks runs: one engine object, no Lightning.

:class:`MetaBatchEngine` adapts every task of a meta-batch by gradient steps on its support set and predicts its
queries. It owns the choices that make MAML fast or lean, and nothing else:

- **task parallelism**: one ``vmap`` over the tasks (``torch.func``), where a linear/activation chain runs through
  :func:`~lightning_meta.functional.batched_chain` and its hand-written gradient; or a loop over tasks with
  ``torch.autograd.grad``;
- **task chunks**: the meta-batch in chunks of ``task_chunk`` tasks;
- **streaming**: in training, each chunk's share of the meta-loss is differentiated as soon as the chunk is done and
  its graph freed, so peak memory is one chunk's graph (:meth:`MetaBatchEngine.run` with ``share``); the summed
  gradients come back as a :class:`Streamed` whose :meth:`Streamed.loss` has exactly that value and those gradients;
- **precision**: the inner loss scale (float16), the outer scale of streamed gradients (a gradient scaler's), and
  batch norm in float32 under autocast (:func:`norms_in_float32`);
- **tasks of different shapes** (a ragged meta-batch: variable ways, shots and queries, :meth:`MetaBatchEngine.run_groups`):
  the tasks of one shape form a :class:`TaskGroup`, stacked ``[G, n, ...]``; each group runs as a fixed meta-batch
  does (one ``vmap`` per group, or its chunks; on the loop task by task; streamed chunk by chunk within the group;
  compiled per group shape), so no padded example ever enters the network (batch norm normalises each task with its
  own support statistics, as for a fixed task). A task of ``N`` classes uses the head's first ``N`` outputs only
  (:class:`~lightning_meta.functional.inner_loop.Head`: the others are removed, not masked), so its inner loop and
  query logits ``[M, N]`` are exactly those of that task alone. The outputs come back in task order, ``[B, T, M_max,
  N_max]`` with ``-inf`` outside each task's own ``[M_i, N_i]`` cells when the shapes differ;
- **the head's start**: the learned initialization, or Proto-MAML's (Triantafillou et al. 2020): each task's head
  starts at ``W = 2c``, ``b = -|c|^2`` from the prototypes ``c`` of the head's input features, computed with the
  body's current parameters (gradients flow through the prototypes into the body, first order too, as in the
  reference's ``proto_maml_fc_layer_init``).

The engine holds its configuration only, never a module or anything built from one: every call is given the
module and derives what it needs from it then (:class:`Network`), so a deep copy, a pickle, a layer conversion or a
``load_state_dict`` of the learner can never run stale modules.

The learner (:class:`~lightning_meta.MAML`) decides the rest: which parameters adapt, their rates, how many steps,
first or second order, and what the meta-loss is.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from lightning_meta._checks import check_choice
from lightning_meta.functional.batched import batched_chain, batched_chain_grads
from lightning_meta.functional.episode import per_task_loss, target_ndim, unscaled
from lightning_meta.functional.inner_loop import (
    HEAD_INITS,
    Head,
    LearningRates,
    Params,
    descend,
    finite_steps,
    functional_forward,
    inner_adapt,
    inner_adapt_batched,
    prototype_head,
    scaled_grad,
)

TASK_PARALLEL = ("auto", "vmap", "loop")
TRAJECTORIES = ("last", "all", "all_and_initial")
# share(tasks, outputs [c, T, M, ...]) -> the meta-loss terms of those tasks (their positions in the meta-batch)
Share = Callable[[list[int], Tensor], Tensor]
# compiled(name, fn) -> fn compiled once per name (MetaLearner.compiled)
Compiled = Callable[[str, Callable], Callable]


@dataclass
class Adapted:
    """What a meta-batch's inner loops produced: query ``outputs [B, T, M, ...]`` (T = 1 for the last step, or one
    per step, see ``trajectory``; tasks of different shapes: ``[B, T, M_max, N_max]``, ``-inf`` outside each task's
    own cells), support ``losses [B, steps]`` and ``finite [B, steps]`` (each step's loss and the parameters it
    produced were finite)."""

    outputs: Tensor
    losses: Tensor
    finite: Tensor


@dataclass
class TaskGroup:
    """Tasks of one shape in a meta-batch: their positions ``tasks`` and their support set and queries, stacked
    ``[G, n, ...]``. ``n_way``: the head's outputs they use (its first ``n_way``; ``None``: all of them)."""

    tasks: list[int]
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    n_way: Optional[int] = None


@dataclass
class Streamed:
    """A meta-loss whose gradients were taken chunk by chunk: its ``value`` and, for each leaf, its gradient."""

    value: Tensor
    gradients: list[tuple[Tensor, Tensor]]

    def loss(self) -> Tensor:
        """A scalar with this value whose backward gives each leaf its gradient (times the incoming gradient, e.g.
        an AMP scale), so Lightning's backward, gradient scaling, clipping and DDP all-reduce are unchanged."""
        leaves = [leaf for leaf, _ in self.gradients]
        return _WithGradients.apply(self.value, [g.to(p.dtype) for p, g in self.gradients], *leaves)


class _WithGradients(torch.autograd.Function):
    """``value`` as a loss whose gradient with respect to each leaf is the given one. A custom backward rather than
    ``value + ((p - p.detach()) * g).sum()``: an infinite ``g`` (a float16 overflow, which the gradient scaler must
    see and skip) would make that sum's value NaN."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: list, *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *(grad_output.to(g.dtype) * g for g in ctx.grads))


def autocast_enabled() -> bool:
    """Whether autocast is on for CUDA or the CPU."""
    try:
        return any(torch.is_autocast_enabled(device) for device in ("cuda", "cpu"))
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _input_in_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    weight = module.weight if module.weight is not None else torch.empty(0)
    return (args[0].to(weight.dtype),) + tuple(args[1:])


@contextlib.contextmanager
def norms_in_float32(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Under autocast, the batch norms ``norms`` take their input in their weights' dtype (float32) for the duration:
    batch norm's double backward (second-order MAML) returns NaN for float16 inputs, and its batching rule under
    ``vmap`` rejects a reduced-precision input with float32 weights. Convolutions and matmuls stay reduced."""
    if not norms or not autocast_enabled():
        yield
        return
    with _removed_after([m.register_forward_pre_hook(_input_in_weight_dtype) for m in norms]):
        yield


@contextlib.contextmanager
def _removed_after(handles: list) -> Iterator[None]:
    """The hooks of ``handles`` for the duration only."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``module``, which the MAML family normalises task by task. ``SyncBatchNorm`` (what
    ``Trainer(sync_batchnorm=True)`` converts them to) is refused: it pools the statistics of every process, whose
    tasks differ."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sync = [m for m in norms if isinstance(m, nn.SyncBatchNorm)]
    if sync:
        raise ValueError(
            f"The backbone has {len(sync)} SyncBatchNorm layer(s): synchronised batch norm pools the batch statistics "
            "of every process, but each process adapts to its own tasks, so every task would be normalised with other "
            "tasks' examples (and the MAML family already normalises each task by its own statistics). Remove "
            "`sync_batchnorm=True` from the Trainer (or don't convert the backbone's batch norms).")
    return norms


BATCH_NORM = ("support", "transductive")


class _SupportNormalised:
    """Hooks that make a batch norm normalise with the statistics of the first ``support`` rows of its input. The
    pre-hook keeps the input and hands batch norm two rows only (its own output is replaced, so it should not spend
    a full pass); the forward hook computes the output from the kept input."""

    def __init__(self, support: Optional[int]) -> None:
        self.support = support  # None: all rows (a batch's own statistics, by the same explicit formula)
        self.kept: list[Tensor] = []

    def before(self, module: nn.Module, args: tuple) -> tuple:
        self.kept.append(args[0])
        return (args[0][:2],) + tuple(args[1:])

    def after(self, module: nn.modules.batchnorm._BatchNorm, args: tuple, output: Tensor) -> Tensor:
        x = self.kept.pop()  # [S + M, C, ...]: this task's support rows first
        dims = [0, *range(2, x.dim())]
        rows = x[: self.support] if self.support is not None else x
        var, mean = torch.var_mean(rows, dims, unbiased=False, keepdim=True)  # [1, C, 1, ...]
        scale = torch.rsqrt(var + module.eps)  # normalising is one affine map per channel: x * scale + shift
        if module.weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = scale * module.weight.view(shape)
            shift = module.bias.view(shape) - mean * scale
        else:
            shift = -mean * scale
        return torch.addcmul(shift, x, scale).to(output.dtype)  # one pass over the activations


@contextlib.contextmanager
def support_statistics(norms: Sequence[nn.Module], support: Optional[int]) -> Iterator[None]:
    """For the duration, the batch norms ``norms`` normalise a batch whose first ``support`` rows are a task's
    support set with the statistics of those rows alone (biased variance, as batch norm normalises a batch), so each
    of the other rows (queries) is normalised independently of the others: its output is the same alone or in any
    batch. Works inside ``vmap`` (each task's rows) and with ``functional_call`` (the adapted affine weights).
    ``support=None``: every batch with its own statistics, as batch norm does, by this explicit formula (the
    compiled inner loop uses it: ``torch.func.grad`` under ``vmap`` through batch norm's own kernel gives wrong
    second-order gradients, 5e-3 off in float64 with torch 2.14, measured against a loop of the same function)."""
    hooks = _SupportNormalised(support)
    with _removed_after([h for m in norms for h in (m.register_forward_pre_hook(hooks.before),
                                                    m.register_forward_hook(hooks.after))]):
        yield


def predict_queries(forward: Callable, params: Params, support_x: Tensor, query_x: Tensor,
                    norms: Sequence[nn.Module], batch_norm: str = "support", dim: int = 0) -> Tensor:
    """``forward(params, query_x)`` with batch norm as ``batch_norm`` says: ``"transductive"`` normalises the queries
    with their own batch statistics (the MAML paper's code); ``"support"`` with their task's support statistics
    (:func:`support_statistics`), so a query's prediction does not depend on which other queries share its batch.
    ``dim``: the dimension of the examples (0 for one task ``[n, ...]``, 1 for a meta-batch ``[B, n, ...]``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
        >>> forward, params = functional_forward(net), dict(net.named_parameters())
        >>> sx, qx = torch.randn(6, 2), torch.randn(5, 2)
        >>> together = predict_queries(forward, params, sx, qx, [net[1]])
        >>> alone = torch.cat([predict_queries(forward, params, sx, q[None], [net[1]]) for q in qx])
        >>> torch.allclose(together, alone, atol=1e-6)
        True
    """
    check_choice("batch_norm", batch_norm, BATCH_NORM)
    if batch_norm == "transductive" or not norms:
        return forward(params, query_x)
    support = support_x.shape[dim]
    with support_statistics(norms, support):
        out = forward(params, torch.cat([support_x, query_x], dim))
    return out.narrow(dim, support, query_x.shape[dim])


@dataclass
class Network:
    """What the engine derives from a module for one call, and never keeps: ``forward(params, x)``
    (:func:`~lightning_meta.functional.functional_forward`), the batched linear chain and its hand-written gradient
    where the module is such a chain (else ``None``), its batch norms, whether it has convolutions, and its head (the
    last ``nn.Linear``, or ``None``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
        >>> found = Network.of(net)
        >>> found.chain is None, len(found.norms), found.has_conv   # batch norm is not a chain link
        (True, 1, False)
    """

    forward: Callable[[Params, Tensor], Tensor]
    chain: Optional[Callable]
    chain_grads: Optional[Callable]
    norms: list[nn.modules.batchnorm._BatchNorm]
    has_conv: bool
    head: Optional[Head] = None

    @classmethod
    def of(cls, module: nn.Module, chain: bool = True) -> Network:
        """Derive from ``module`` now (``chain=False``: no batched chain, ``vmap`` over ``functional_call``)."""
        norms = batch_norms(module)
        fast = batched_chain(module) if chain else None
        return cls(functional_forward(module), fast, batched_chain_grads(module) if fast is not None else None, norms,
                   has_convolutions(module), Head.of(module))

    def head_features(self, params: Params, x: Tensor, batched: bool = False) -> Tensor:
        """The head's input features ``[n, D]`` of inputs ``x [n, ...]`` with ``params`` (``batched``: a meta-batch,
        ``x [B, n, ...]`` -> ``[B, n, D]``, the parameters shared): the network with the identity for its head (``x @
        I + 0`` is exact), which is its output layer. The inner loop takes its gradients with respect to views of its
        own (:func:`_own_nodes`) or as separate variables (``torch.func.grad``), so they never count this path."""
        head = cast(Head, self.head)  # callers checked that there is one, with a bias
        weight = params.get(head.weight)
        like = weight if weight is not None else next(iter(params.values()))
        identity = {head.weight: torch.eye(head.in_features, dtype=like.dtype, device=like.device),
                    cast(str, head.bias): torch.zeros(head.in_features, dtype=like.dtype, device=like.device)}
        body = {k: v for k, v in params.items() if k not in identity}
        if not batched:
            return self.forward({**body, **identity}, x)
        if self.chain is not None:  # the batched chain takes shared [O, F] weights beside per-task ones
            return self.chain({**{k: v.expand(x.shape[0], *v.shape) for k, v in body.items()}, **identity}, x)
        one = functools.partial(_with, self.forward, identity)
        return torch.func.vmap(one, in_dims=(None, 0), randomness="different")(body, x)

    def head_start(self, params: Params, support_x: Tensor, support_y: Tensor, batched: bool = False) -> Params:
        """Proto-MAML's start of the head for the task (or each task, ``batched``: ``[B, ...]`` entries):
        :func:`~lightning_meta.functional.inner_loop.prototype_head` of the head's input features of its support set,
        with as many classes as the head in ``params`` has outputs (narrowed to the task's ways by the caller)."""
        head = cast(Head, self.head)
        weight = params.get(head.weight)
        n = weight.shape[-2] if weight is not None else head.out_features
        dtype = weight.dtype if weight is not None else support_x.dtype
        return prototype_head(head, self.head_features(params, support_x, batched), support_y, n, dtype)


def _with(forward: Callable, extra: Params, params: Params, x: Tensor) -> Tensor:
    return forward({**params, **extra}, x)


def _own_nodes(params: Params, head: Head) -> Params:
    """The inner loop's parameters after Proto-MAML's start (:meth:`Network.head_start`): the head as started, every
    other parameter a view of its own, for gradients by ``torch.autograd.grad`` (the loop, and vmap where the batched
    chain's gradient does not cover the network): the gradient with respect to that view is the support loss's
    partial derivative, the head held fixed (with respect to the parameter itself it would also count the path
    through the prototypes). A head computed without a graph (ANIL in evaluation: detached features) becomes a leaf
    that requires gradients."""
    out = {k: v if k in (head.weight, head.bias) else v.view_as(v) for k, v in params.items()}
    if not torch.is_grad_enabled():
        return out
    return {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in out.items()}


def has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


@contextlib.contextmanager
def out_of_place(module: nn.Module) -> Iterator[None]:
    """For the duration, the modules of ``module`` with an ``inplace`` flag (``ReLU(inplace=True)``, ...) compute out of
    place: the same values, but an in-place activation after one whose output its backward needs (``Tanh ->
    LeakyReLU(inplace=True)``) would overwrite that output, which autograd refuses and a hand-written gradient would
    silently get wrong. The inner loop keeps every activation for its second-order backward anyway."""
    flagged: list[Any] = [m for m in module.modules() if getattr(m, "inplace", None) is True]
    for m in flagged:
        m.inplace = False
    try:
        yield
    finally:
        for m in flagged:
            m.inplace = True


class MetaBatchEngine:
    """Runs the inner loops of a meta-batch of tasks on the module it is given (see the module docstring). It keeps
    its configuration only: each call derives what it needs from the module passed to it.

    Args:
        task_parallel: ``"vmap"``, ``"loop"`` or ``"auto"`` (vmap on a GPU, and on a CPU for networks without
            convolutions, whose vmapped form is slower there than a loop; ``benchmarks/bench_gpu.py`` measures it).
        task_chunk: tasks per chunk when streaming (``None``: the whole meta-batch under vmap, one task on the loop).
        batch_norm: how queries are normalised (:func:`predict_queries`): ``"support"`` or ``"transductive"``.
        batched_chain: under vmap, run a chain of linear layers and elementwise modules by
            :func:`~lightning_meta.functional.batched_chain` and its hand-written gradient (the same numbers, faster);
            ``False``: ``torch.func.vmap`` over ``functional_call`` for every network.

    Example:
        >>> from lightning_meta.models import MLP
        >>> net = MLP(1, (8,), 1)
        >>> engine = MetaBatchEngine(task_parallel="vmap")
        >>> params = dict(net.named_parameters())
        >>> sx, sy, qx = torch.randn(4, 5, 1), torch.randn(4, 5), torch.randn(4, 3, 1)
        >>> adapted, _ = engine.run(net, params, lambda s: dict.fromkeys(params, 0.1), sx, sy, qx, steps=2)
        >>> adapted.outputs.shape, adapted.losses.shape      # [B, T=1, M, 1], [B, steps]
        (torch.Size([4, 1, 3, 1]), torch.Size([4, 2]))
    """

    def __init__(self, task_parallel: str = "auto", task_chunk: Optional[int] = None, batch_norm: str = "support",
                 batched_chain: bool = True) -> None:
        check_choice("task_parallel", task_parallel, TASK_PARALLEL)
        check_choice("batch_norm", batch_norm, BATCH_NORM)
        self.task_parallel, self.task_chunk = task_parallel, task_chunk
        self.batch_norm, self.batched_chain = batch_norm, batched_chain

    def network(self, module: nn.Module) -> Network:
        """What this engine runs ``module`` with, derived now."""
        return Network.of(module, self.batched_chain)

    def use_vmap(self, module: nn.Module, device: torch.device) -> bool:
        """Whether the tasks run under one ``vmap`` (else a loop) for ``module`` on ``device``."""
        if self.task_parallel != "auto":
            return self.task_parallel == "vmap"
        return torch.device(device).type == "cuda" or not has_convolutions(module)

    def streams(self, module: nn.Module, device: torch.device) -> bool:
        """Whether training streams here: on the loop always, under vmap when ``task_chunk`` splits the meta-batch."""
        return not self.use_vmap(module, device) or self.task_chunk is not None

    def run(self, module: nn.Module, params: Params, rates: LearningRates, support_x: Tensor, support_y: Tensor,
            query_x: Tensor, steps: int, first_order: bool = False, loss_scale: float = 1.0, trajectory: str = "last",
            share: Optional[Share] = None, leaves: Sequence[Tensor] = (), outer_scale: float = 1.0,
            compiled: Optional[Compiled] = None, n_way: Optional[int] = None,
            head_init: str = "learned") -> tuple[Adapted, Optional[Streamed]]:
        """Adapt ``params`` (parameters of ``module``, by name, shared by all tasks) to each task ``[B, n, ...]`` and
        predict its queries.

        ``trajectory``: the query outputs after the last step (``"last"``), after every step (``"all"``), or also
        before the first (``"all_and_initial"``). With ``share``, each chunk's meta-loss terms are differentiated
        with respect to ``leaves`` as soon as the chunk is done (scaled by ``outer_scale``, e.g. a gradient scaler's
        scale, and unscaled in the wider of float32 and the gradient's dtype); the outputs then come back detached
        with the :class:`Streamed` sums.

        ``compiled`` (``(name, fn) -> compiled fn``): run each task's, or each vmapped chunk's, whole inner loop and
        query pass as one compiled function (:meth:`compiled_core`); the same numbers, and the same choices of
        vmap, chunks and streaming, as the eager paths.

        ``n_way``: the tasks use the head's first ``n_way`` outputs only (``None``: all); ``head_init``:
        ``"learned"`` (``params``' head) or ``"prototypes"`` (Proto-MAML's start, see the module docstring). A
        meta-batch of tasks of different shapes runs through :meth:`run_groups`."""
        group = TaskGroup(list(range(support_x.shape[0])), support_x, support_y, query_x, n_way)
        return self.run_groups(module, params, rates, [group], steps, first_order, loss_scale, trajectory, share,
                               leaves, outer_scale, compiled, head_init)

    def run_groups(self, module: nn.Module, params: Params, rates: LearningRates, groups: Sequence[TaskGroup],
                   steps: int, first_order: bool = False, loss_scale: float = 1.0, trajectory: str = "last",
                   share: Optional[Share] = None, leaves: Sequence[Tensor] = (), outer_scale: float = 1.0,
                   compiled: Optional[Compiled] = None, head_init: str = "learned") -> tuple[Adapted, Optional[Streamed]]:
        """:meth:`run` for a meta-batch of tasks of different shapes, given as groups of one shape each
        (:class:`TaskGroup`, every task of the meta-batch in exactly one): each group runs as a meta-batch of its
        own (its chunks streamed as :meth:`run` streams them; ``share`` is given the tasks' positions in the
        meta-batch), with the head narrowed to its ``n_way``. The results come back in task order: outputs ``[B, T,
        M, N]`` where every task has that shape, else ``[B, T, M_max, N_max]`` with ``-inf`` outside each task's
        own cells; support losses and finite steps ``[B, steps]``.

        Example:
            >>> from lightning_meta.models import MLP
            >>> net, engine = MLP(4, (8,), 5), MetaBatchEngine(task_parallel="loop")
            >>> params = dict(net.named_parameters())
            >>> three = TaskGroup([0, 2], torch.randn(2, 6, 4), torch.arange(3).repeat(2, 2), torch.randn(2, 3, 4), 3)
            >>> two = TaskGroup([1], torch.randn(1, 4, 4), torch.arange(2).repeat(1, 2), torch.randn(1, 5, 4), 2)
            >>> adapted, _ = engine.run_groups(net, params, lambda s: dict.fromkeys(params, 0.1), [three, two], steps=1)
            >>> adapted.outputs.shape, adapted.outputs[1, 0, :, 2].tolist()   # task 1: 5 queries, 2 classes
            (torch.Size([3, 1, 5, 3]), [-inf, -inf, -inf, -inf, -inf])
        """
        check_choice("trajectory", trajectory, TRAJECTORIES)
        check_choice("head_init", head_init, HEAD_INITS)
        net = self.network(module)
        prototypes = head_init == "prototypes"
        self._check_head(module, net, prototypes, [g.n_way for g in groups], [g.support_y for g in groups])
        vmap = self.use_vmap(module, groups[0].support_x.device)
        stream = _Stream(share, list(leaves), outer_scale) if share is not None else None
        if compiled is not None:
            run = self._compiled_run(module, net, compiled, vmap, prototypes)
        else:
            run = functools.partial(self._vmap if vmap else self._loop, net, prototypes)
        pieces = []
        with out_of_place(module), norms_in_float32(net.norms):
            for group in groups:
                group_params, group_rates = _narrowed(net.head, params, rates, group.n_way)
                b = len(group.tasks)
                chunk = (self.task_chunk or (b if vmap else 1)) if share is not None else b
                for lo in range(0, b, chunk):
                    part = slice(lo, min(lo + chunk, b))
                    tasks = group.tasks[part]
                    out, losses, finite = run(group_params, group_rates, group.support_x[part], group.support_y[part],
                                              group.query_x[part], steps, first_order, loss_scale, trajectory)
                    pieces.append((tasks, stream.take(tasks, out) if stream else out, losses, finite))
        return _in_task_order(pieces), (stream.result() if stream else None)

    def adapt(self, module: nn.Module, params: Params, rates: LearningRates, support_x: Tensor, support_y: Tensor,
              steps: int, loss_scale: float = 1.0, n_way: Optional[int] = None,
              head_init: str = "learned") -> tuple[list[Params], Tensor, Tensor]:
        """One task ``[n, ...]``, first order (deployment): :func:`~lightning_meta.functional.inner_adapt` on
        ``module``, as :meth:`run` adapts each task in evaluation (``n_way``, ``head_init`` as there)."""
        check_choice("head_init", head_init, HEAD_INITS)
        net = self.network(module)
        prototypes = head_init == "prototypes"
        self._check_head(module, net, prototypes, [n_way], [support_y])
        params, rates = _narrowed(net.head, params, rates, n_way)
        with out_of_place(module), norms_in_float32(net.norms):
            if prototypes:
                params = {**params, **net.head_start(params, support_x, support_y)}
            return inner_adapt(net.forward, params, support_x, support_y, steps, rates, True, loss_scale)

    def predict(self, module: nn.Module, params: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """One task's query outputs with ``params`` (adapted) in ``module``, batch norm as this engine's mode says."""
        net = self.network(module)
        with out_of_place(module), norms_in_float32(net.norms):
            return predict_queries(net.forward, params, support_x, query_x, net.norms, self.batch_norm)

    @staticmethod
    def _check_head(module: nn.Module, net: Network, prototypes: bool, n_ways: Sequence[Optional[int]],
                    targets: Sequence[Tensor]) -> None:
        narrow = any(n is not None for n in n_ways)
        if (prototypes or narrow) and net.head is None:
            why = "Proto-MAML starts the head" if prototypes else "A task of N classes uses the first N outputs of the head"
            raise ValueError(f"{why} (the last nn.Linear of the adapted module), but the adapted {type(module).__name__} "
                             "has no nn.Linear.")
        if prototypes and net.head is not None and net.head.bias is None:
            raise ValueError("Proto-MAML sets the head's bias to -|c_k|^2, but the head (the last nn.Linear) has no bias: "
                             "build it with bias=True.")
        if prototypes and any(t.is_floating_point() for t in targets):
            raise ValueError("Proto-MAML starts the head from the support set's class prototypes: it needs "
                             "classification tasks (integer labels), but got float targets.")

    def _vmap(self, net, prototypes, params, rates, sx, sy, qx, steps, first_order, loss_scale, trajectory):
        """Every task of the chunk at once: one batched call per layer, one autograd call per inner step."""
        forward = net.chain or torch.func.vmap(net.forward, randomness="different")
        batched = {n: p.expand(sx.shape[0], *p.shape) for n, p in params.items()}
        if prototypes:  # the features through views of their own (see _own_nodes)
            batched = _own_nodes({**batched, **net.head_start(params, sx, sy, batched=True)}, net.head)
        path, losses, finite = inner_adapt_batched(forward, batched, sx, sy, steps, rates, first_order, loss_scale,
                                                   net.chain_grads)
        outputs = [predict_queries(forward, p, sx, qx, net.norms, self.batch_norm, dim=1) for p in _pick(path, trajectory)]
        return torch.stack(outputs, 1), losses, finite

    def _loop(self, net, prototypes, params, rates, sx, sy, qx, steps, first_order, loss_scale, trajectory):
        """One task after another, each with ``torch.autograd.grad`` (cheaper per call than ``torch.func.grad``)."""
        per_task = []
        for i in range(sx.shape[0]):
            start = _own_nodes({**params, **net.head_start(params, sx[i], sy[i])}, net.head) if prototypes else params
            path, losses, finite = inner_adapt(net.forward, start, sx[i], sy[i], steps, rates, first_order,
                                               loss_scale, engine="autograd")
            outputs = [predict_queries(net.forward, p, sx[i], qx[i], net.norms, self.batch_norm)
                       for p in _pick(path, trajectory)]
            per_task.append((torch.stack(outputs), losses, finite))
        out, losses, finite = (torch.stack(r) for r in zip(*per_task))
        return out, losses, finite

    def compiled_core(self, module: nn.Module, vmap: bool, steps: int, first_order: bool, loss_scale: float,
                      trajectory: str, head_init: str = "learned") -> Callable:
        """The pure function a compiled run compiles: ``core(params, rates, support_x, support_y, query_x) ->
        (query outputs [T, M, ...], support losses [steps], finite [steps])`` for one task (``[n, ...]`` inputs), or
        with a leading task dimension on inputs and results under ``vmap``. ``rates``: one ``{name: rate}`` per step.
        Gradients by ``torch.func.grad``, so the inner loop's backward is part of the traced graph and the
        second-order meta-gradient is that graph's ordinary backward; no ``.item()``, no ``autograd.grad``, no graph
        break. Batch norm runs under the :func:`support_statistics` hooks that :meth:`run` installs around the call;
        in ``"support"`` mode the queries run behind their support rows. ``head_init="prototypes"``: each task's head
        starts at Proto-MAML's start inside the core (its width that of the head in ``params``)."""
        return self._core(self.network(module), vmap, steps, first_order, loss_scale, trajectory,
                          head_init == "prototypes")

    def _core(self, net: Network, vmap: bool, steps: int, first_order: bool, loss_scale: float,
              trajectory: str, prototypes: bool = False) -> Callable:
        forward, support_norm = net.forward, self.batch_norm == "support" and bool(net.norms)

        def core(params: Params, rates: list, sx: Tensor, sy: Tensor, qx: Tensor):
            ndim = target_ndim(sy, 0)
            if prototypes:  # torch.func.grad takes each entry as its own variable: no views needed
                params = {**params, **net.head_start(params, sx, sy)}

            def gradient(p: Params) -> tuple[Params, Tensor]:
                grads, loss = scaled_grad(lambda q: per_task_loss(forward(q, sx), sy, ndim), p, loss_scale)
                return ({k: g.detach() for k, g in grads.items()} if first_order else grads), loss

            path, losses = descend(params, steps, lambda step: rates[step], gradient)
            finite = finite_steps([{k: v.unsqueeze(0) for k, v in p.items()} for p in path], losses)[0]
            s = sx.shape[0]
            outputs = [forward(p, torch.cat([sx, qx]))[s:] if support_norm else forward(p, qx)
                       for p in _pick(path, trajectory)]
            return torch.stack(outputs), losses[0], finite

        return torch.func.vmap(core, in_dims=(None, None, 0, 0, 0), randomness="different") if vmap else core

    def _compiled_run(self, module: nn.Module, net: Network, compiled: Compiled, vmap: bool,
                      prototypes: bool = False) -> Callable:
        # the module's own layers are part of the name: a converted or replaced layer compiles anew
        layers = hashlib.sha1(repr([(id(m), type(m).__name__) for m in module.modules()]).encode()).hexdigest()[:8]

        def run(params, rates, sx, sy, qx, steps, first_order, loss_scale, trajectory):
            name = (f"inner loop ({'vmap' if vmap else 'one task'}, {steps} steps, "
                    f"{'first' if first_order else 'second'} order, loss scale {loss_scale}, outputs {trajectory}, "
                    f"batch norm {self.batch_norm}, {'prototype' if prototypes else 'learned'} head, layers {layers})")
            core = compiled(name, self._core(net, vmap, steps, first_order, loss_scale, trajectory, prototypes))
            per_step = [rates(step) for step in range(steps)]
            with support_statistics(net.norms, sx.shape[1] if self.batch_norm == "support" else None):
                if vmap:
                    return core(params, per_step, sx, sy, qx)
                results = [core(params, per_step, sx[i], sy[i], qx[i]) for i in range(sx.shape[0])]
            out, losses, finite = (torch.stack(r) for r in zip(*results))
            return out, losses, finite

        return run


def _narrowed(head: Optional[Head], params: Params, rates: LearningRates,
              n_way: Optional[int]) -> tuple[Params, LearningRates]:
    """``params`` and ``rates`` with the head cut to its first ``n_way`` outputs (``None``: as they are)."""
    if n_way is None or head is None:
        return params, rates
    return head.narrow(params, n_way), lambda step: head.narrow(rates(step), n_way)


def _in_task_order(pieces: list[tuple[list[int], Tensor, Tensor, Tensor]]) -> Adapted:
    """The results of the chunks ``(tasks, outputs [c, T, ...], losses [c, steps], finite [c, steps])`` as one
    :class:`Adapted` in task order; outputs of different shapes padded to the largest with ``-inf``."""
    tasks = [t for piece in pieces for t in piece[0]]
    losses, finite = torch.cat([p[2] for p in pieces]), torch.cat([p[3] for p in pieces])
    outs = [p[1] for p in pieces]
    position = [0] * len(tasks)
    for i, t in enumerate(tasks):
        position[t] = i
    if position != list(range(len(tasks))):
        order = torch.tensor(position, device=losses.device)
        losses, finite = losses[order], finite[order]
    if all(o.shape[1:] == outs[0].shape[1:] for o in outs):  # one shape (a fixed meta-batch): no padding
        outputs = torch.cat(outs)
        in_order = position == list(range(len(tasks)))
        return Adapted(outputs if in_order else outputs[torch.tensor(position, device=outputs.device)], losses, finite)
    largest = [max(o.shape[d] for o in outs) for d in range(1, outs[0].dim())]
    outputs = outs[0].new_full((len(tasks), *largest), float("-inf"))  # [B, T, M_max, N_max]
    for piece_tasks, out, _, _ in pieces:
        index: tuple[Any, ...] = (torch.tensor(piece_tasks, device=out.device),)
        outputs[index + tuple(slice(0, size) for size in out.shape[1:])] = out
    return Adapted(outputs, losses, finite)


def _pick(path: list[Params], trajectory: str) -> list[Params]:
    """The parameters whose query outputs are wanted, from ``path`` (initial, after step 1, ..., after the last)."""
    if trajectory == "last":
        return path[-1:]
    return path if trajectory == "all_and_initial" else path[1:]


class _Stream:
    """Differentiates each chunk's share of the meta-loss as soon as it is done and adds the gradients up."""

    def __init__(self, share: Share, leaves: list[Tensor], outer_scale: float) -> None:
        self.share, self.leaves, self.scale = share, leaves, outer_scale
        self.total: Tensor | float = 0.0
        self.sums: list[Optional[Tensor]] = [None] * len(leaves)

    def take(self, tasks: list[int], outputs: Tensor) -> Tensor:
        share = self.share(tasks, outputs)
        grads = torch.autograd.grad(share * self.scale, self.leaves, allow_unused=True)
        for j, g in enumerate(grads):
            if g is not None:
                g = unscaled(g, self.scale)
                total = self.sums[j]
                self.sums[j] = g if total is None else total + g
        self.total = self.total + share.detach()
        return outputs.detach()  # the graph of these tasks is freed here

    def result(self) -> Streamed:
        value = self.total if isinstance(self.total, Tensor) else torch.tensor(self.total)
        return Streamed(value, [(p, g) for p, g in zip(self.leaves, self.sums) if g is not None])
