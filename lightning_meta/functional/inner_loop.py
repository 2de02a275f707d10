"""The MAML inner loop as a pure function of (params, support), built on ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TypeVar, Union, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta._checks import check_choice, surely_finite
from lightning_meta.functional.batched import BatchedGrads
from lightning_meta.functional.episode import full_precision, per_task_loss, target_ndim, unscaled

Params = dict[str, Tensor]
Forward = Callable[[Params, Tensor], Tensor]  # (params, inputs) -> outputs
ENGINES = ("func", "autograd")
LearningRates = Callable[[int], dict[str, Union[Tensor, float]]]
HEAD_INITS = ("learned", "prototypes")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Head:
    """A module's head, its last ``nn.Linear``, by the names of its parameters (as in ``named_parameters()``). A task
    of ``N`` classes uses the head's first ``N`` outputs (:meth:`narrow`): the other classes' logits are removed, not
    masked; Proto-MAML starts the head at the task's prototypes (:func:`prototype_head`).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
        >>> head = Head.of(net)
        >>> head, {k: tuple(v.shape) for k, v in head.narrow(dict(net.named_parameters()), 7).items()}["2.weight"]
        (Head(weight='2.weight', bias='2.bias', in_features=8, out_features=10), (7, 8))
    """

    weight: str
    bias: Optional[str]
    in_features: int
    out_features: int

    @classmethod
    def of(cls, module: nn.Module) -> Optional[Head]:
        """The head of ``module`` (``None`` without an ``nn.Linear`` whose weight is one of its parameters)."""
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        names = {id(p): n for n, p in module.named_parameters()}
        if not linears or id(linears[-1].weight) not in names:
            return None
        last = linears[-1]
        bias = names.get(id(last.bias)) if last.bias is not None else None
        return cls(names[id(last.weight)], bias, last.in_features, last.out_features)

    def narrow(self, values: dict[str, _V], n: int) -> dict[str, _V]:
        """``values`` (parameters, or Meta-SGD rates shaped like them; a leading task dimension allowed) with the
        head's weight ``[..., O, D]`` and bias ``[..., O]`` cut to their first ``n`` outputs (views: gradients reach the
        full tensors' first ``n`` rows); scalar rates and the other entries as they are."""
        out = dict(values)
        for name, dim in ((self.weight, 2), (self.bias, 1)):
            v = out.get(name) if name is not None else None
            if name is not None and isinstance(v, Tensor) and v.dim() >= dim and v.shape[-dim] == self.out_features:
                out[name] = cast(_V, v.narrow(v.dim() - dim, 0, n))
        return out


def prototype_head(head: Head, features: Tensor, labels: Tensor, n: int, dtype: torch.dtype) -> Params:
    """Proto-MAML's head for a task (Triantafillou et al. 2020, "Meta-Dataset", section 3): ``W_k = 2 c_k`` and
    ``b_k = -|c_k|^2`` from the prototypes ``c_k`` (class means, Snell et al. 2017) of the head's input features
    ``[..., S, D]`` of the support set, labels ``[..., S]`` in ``0..n-1``, so that its logits ``2 c_k . h - |c_k|^2 =
    |h|^2 - |h - c_k|^2`` are the squared-Euclidean ProtoNet's up to a term shared by every class. Computed in float32
    or wider, returned in ``dtype``; differentiable (through the features, into the body).

    Example:
        >>> head = Head("weight", "bias", 2, 5)
        >>> start = prototype_head(head, torch.tensor([[0., 0.], [2., 2.], [3., 1.]]), torch.tensor([0, 0, 1]), 2,
        ...                        torch.float32)
        >>> start["weight"].tolist(), start["bias"].tolist()
        ([[2.0, 2.0], [6.0, 2.0]], [-2.0, -10.0])
    """
    if head.bias is None:
        raise ValueError("Proto-MAML sets the head's bias to -|c_k|^2, but the head (the last nn.Linear) has no bias: "
                         "build it with bias=True.")
    h = full_precision(features)
    onehot = (labels.unsqueeze(-1) == torch.arange(n, device=labels.device)).to(h.dtype)  # [..., S, n]
    c = onehot.transpose(-1, -2) @ h / onehot.sum(-2).clamp_min(1).unsqueeze(-1)  # [..., n, D]
    return {head.weight: (2 * c).to(dtype), head.bias: -(c * c).sum(-1).to(dtype)}


def functional_forward(module: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``forward(params, x)``: ``module(x)`` with the parameters named in ``params`` (names as in
    ``module.named_parameters()``) in place of its own, for ``torch.func`` (``vmap``, ``grad``) and autograd alike.

    A parameter used in several places (one module applied twice, or weights tied between two modules) is replaced in
    every place, so its gradient is the sum over its uses, as in the module itself. (``functional_call``'s own weight
    tying leaves a module registered under two names with a non-leaf tensor in place of its parameter.)

    Example:
        >>> shared = nn.Linear(2, 2)
        >>> net = nn.Sequential(shared, nn.ReLU(), shared)           # one layer, used twice
        >>> params = {n: p * 0 for n, p in net.named_parameters()}   # '0.weight', '0.bias'
        >>> functional_forward(net)(params, torch.ones(1, 2)).tolist(), all(p.is_leaf for p in net.parameters())
        ([[0.0, 0.0]], True)
    """
    canonical = {id(p): name for name, p in module.named_parameters()}
    places = {(f"{prefix}.{attr}" if prefix else attr): canonical[id(p)]
              for prefix, m in module.named_modules() for attr, p in m.named_parameters(recurse=False)}

    def forward(params: Params, x: Tensor) -> Tensor:
        values = {place: params[name] for place, name in places.items() if name in params}
        return functional_call(module, values, (x,), tie_weights=False, strict=False)

    return forward


def scaled_grad(
    loss_fn: Callable[[Params], Tensor], params: Params, scale: float = 1.0, create_graph: bool = True,
    engine: str = "func",
) -> tuple[Params, Tensor]:
    """Gradients of ``loss_fn(params)`` with loss scaling: ``grad(scale * loss) / scale``, unscaled in float32.

    Under float16 autocast small inner-loop gradients underflow to zero; scaling the loss before the backward pass
    and dividing the float32 gradients after keeps them. Returns ``(grads, loss)``; never touches ``.grad``.
    ``loss_fn`` may return a vector of independent task losses: their sum is differentiated and the vector returned.

    ``engine``: ``"func"`` uses ``torch.func.grad`` (composable with ``vmap``; always differentiable for the outer
    loop); ``"autograd"`` uses ``torch.autograd.grad`` with ``create_graph`` (the same numbers with less per-call
    overhead outside ``vmap``; ``create_graph=False`` gives first-order, detached gradients; ``params`` must require
    grad or come from tensors that do).

    Example:
        >>> w = {"w": torch.tensor([1.0], dtype=torch.float16)}
        >>> loss = lambda p: (p["w"] * 1e-8).sum()  # d loss / dw = 1e-8: below float16's smallest number
        >>> scaled_grad(loss, w)[0]["w"].item(), f"{scaled_grad(loss, w, scale=2.0**14)[0]['w'].item():.2e}"
        (0.0, '1.00e-08')
    """
    check_choice("engine", engine, ENGINES)

    def scaled(p: Params) -> tuple[Tensor, Tensor]:
        loss = loss_fn(p)
        total = loss if loss.dim() == 0 else loss.sum()  # per-task losses: their sum, task by task exact
        return total * scale if scale != 1.0 else total, loss

    if engine == "func":
        grads, loss = torch.func.grad(scaled, has_aux=True)(params)
    else:
        scaled_loss, loss = scaled(params)
        values = torch.autograd.grad(scaled_loss, list(params.values()), create_graph=create_graph)
        grads = dict(zip(params, values))
    if scale != 1.0:
        grads = {k: unscaled(g, scale) for k, g in grads.items()}
    return grads, loss


def _sgd_step(p: Tensor, rate: Union[Tensor, float], grad: Tensor) -> Tensor:
    """``p - rate * grad``, in the gradient's precision (float32 after unscaling), then back to the parameter's
    dtype: casting a tiny unscaled gradient to float16 first would underflow it again. A float rate takes one fused
    kernel (``add`` with ``alpha``), which matters for small networks where per-op overhead dominates."""
    fused = (isinstance(rate, float) and p.dtype == grad.dtype and p.dtype in (torch.float32, torch.float64)
             and not torch.compiler.is_compiling())  # compiled, add(alpha=) after func.grad gave wrong numbers (torch 2.14)
    out = torch.add(p, grad, alpha=-rate) if fused and isinstance(rate, float) else p - rate * grad
    return out if out.dtype == p.dtype else out.to(p.dtype)


def inner_adapt(forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
                learning_rates: LearningRates, first_order: bool = False, loss_scale: float = 1.0,
                engine: str = "func") -> tuple[list[Params], Tensor, Tensor]:
    """Adapt ``params`` to one task by ``steps`` gradient steps on its support set (Finn et al. 2017, eq. 1).

    ``theta_{i+1} = theta_i - alpha_i * grad L_support(theta_i)``. The result is differentiable with respect to the
    initial ``params`` (second order) unless ``first_order``, where each step's gradient is treated as a constant.

    Args:
        forward: ``(params, x) -> outputs``, e.g. :func:`functional_forward` of a module.
        params: the parameters to adapt, by name.
        support_x, support_y: one task's support set (no batch dimension).
        steps: number of inner steps.
        learning_rates: ``step -> {name: rate}``; a rate is a float, a scalar tensor or a tensor shaped like its
            parameter (Meta-SGD), and may be learnable.
        first_order: drop second-order terms.
        loss_scale: loss scaling for float16 (see :func:`scaled_grad`).
        engine: how gradients are taken (see :func:`scaled_grad`): ``"func"`` (required under ``vmap``) or
            ``"autograd"`` (faster in a plain loop; the initial ``params`` must require grad).

    Returns:
        ``(params after each step [steps + 1 dicts, the first the initial], inner losses [steps],
        finite steps [steps] as booleans)``. Step i is finite when its support loss and the parameters it produced
        are: a non-finite gradient always makes the parameters non-finite, and so does an update that overflows.

    Example:
        >>> w = {"w": torch.tensor(1.0, requires_grad=True)}
        >>> fwd = lambda p, x: p["w"] * x
        >>> traj, losses, ok = inner_adapt(fwd, w, torch.ones(4), torch.full((4,), 3.0), 1, lambda s: {"w": 0.25})
        >>> round(traj[-1]["w"].item(), 4), losses.tolist(), ok.tolist()   # w - 0.25 * 2 * (w - 3) = 2
        (2.0, [4.0], [True])
    """
    ndim = target_ndim(support_y, 0)

    def gradient(p: Params) -> tuple[Params, Tensor]:
        grads, loss = scaled_grad(lambda q: per_task_loss(forward(q, support_x), support_y, ndim), p, loss_scale,
                                  create_graph=not first_order, engine=engine)
        return ({k: g.detach() for k, g in grads.items()} if first_order else grads), loss

    trajectory, losses = descend(params, steps, learning_rates, gradient)
    batched = [{k: v.unsqueeze(0) for k, v in p.items()} for p in trajectory]  # a meta-batch of one task
    return trajectory, losses[0], _finite_steps(batched, losses)[0]


def inner_adapt_batched(forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, steps: int,
                        learning_rates: LearningRates, first_order: bool = False, loss_scale: float = 1.0,
                        support_grads: Optional[BatchedGrads] = None) -> tuple[list[Params], Tensor, Tensor]:
    """:func:`inner_adapt` for a whole meta-batch at once, with one autograd call per inner step for all tasks.

    ``params`` hold one copy per task, stacked on dim 0 (``p.expand(B, *p.shape)`` of the shared initialization);
    ``forward(params, x)`` maps ``[B, ...]`` inputs to ``[B, ...]`` outputs, each task with its own slice (usually
    ``torch.func.vmap`` of ``functional_call``). Task t's support loss depends only on slice t of the parameters, so
    the gradient of the *sum* of the task losses has task t's own gradient in slice t: exact per-task gradients,
    second order through ``create_graph``, without nesting ``torch.func.grad`` inside ``vmap``. ``support_grads``
    (:func:`~lightning_meta.functional.batched_chain_grads`) computes those gradients without the autograd engine
    where it covers the network; where it returns ``None``, autograd does.

    Returns:
        ``(params after each step [steps + 1 dicts of [B, ...] tensors], inner losses [B, steps],
        finite steps [B, steps])``, finite as in :func:`inner_adapt`. The check costs one sum per parameter tensor
        and one synchronisation for the whole loop; the exact per-task, per-step check runs only when that sum is not
        finite.

    Example:
        >>> w = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}   # two tasks, one weight each
        >>> fwd = lambda p, x: p["w"][:, None] * x                    # [B] x [B, n] -> [B, n]
        >>> traj, losses, ok = inner_adapt_batched(fwd, w, torch.ones(2, 4), torch.full((2, 4), 3.0), 1,
        ...                                        lambda s: {"w": 0.25})
        >>> traj[-1]["w"].tolist(), losses.tolist()   # each task: w - 0.25 * 2 * (w - 3)
        ([2.0, 2.5], [[4.0], [1.0]])
    """
    ndim = target_ndim(support_y, 1)

    def gradient(p: Params) -> tuple[Params, Tensor]:
        got = support_grads(p, support_x, support_y, loss_scale, not first_order) if support_grads else None
        return got or scaled_grad(lambda q: per_task_loss(forward(q, support_x), support_y, ndim), p, loss_scale,
                                  create_graph=not first_order, engine="autograd")

    trajectory, losses = descend(params, steps, learning_rates, gradient)
    return trajectory, losses, _finite_steps(trajectory, losses)


def descend(params: Params, steps: int, learning_rates: LearningRates,
             gradient: Callable[[Params], tuple[Params, Tensor]]) -> tuple[list[Params], Tensor]:
    """The inner loop itself: ``steps`` gradient steps from ``params``; ``(trajectory, support losses [B, steps])``
    where ``gradient(params) -> (grads, losses)`` gives a scalar loss (one task) or one per task ``[B]``."""
    if steps < 1:
        raise ValueError(f"Expected `steps` to be an integer >= 1, but got {steps!r}.")
    trajectory, losses = [params], []
    for step in range(steps):
        grads, loss = gradient(params)
        rates = learning_rates(step)
        params = {k: _sgd_step(p, rates[k], grads[k]) for k, p in params.items()}
        trajectory.append(params)
        losses.append(loss.float().reshape(-1))
    return trajectory, torch.stack(losses, 1)


def _finite_steps(trajectory: list[Params], losses: Tensor) -> Tensor:
    """``[B, steps]``: task b's support loss at step i and its parameters after step i are all finite.

    Non-finite parameters stay non-finite under every later update (inf + x is inf or NaN, NaN + x is NaN), so one
    sum over the losses and the final parameters is finite exactly when every step is, unless finite values overflow
    the sum: only then, or when something is non-finite, the exact per-task, per-step check runs."""
    if surely_finite([losses, *trajectory[-1].values()]):
        return torch.ones_like(losses, dtype=torch.bool)
    return finite_steps(trajectory, losses)


def finite_steps(trajectory: list[Params], losses: Tensor) -> Tensor:
    """``[B, steps]``: task b's support loss at step i and its parameters after step i are all finite; tensors in,
    tensors out, no synchronisation (what a compiled inner loop computes). ``trajectory``: ``steps + 1`` dicts of
    ``[B, ...]`` parameters, the first the initial ones; ``losses``: ``[B, steps]``."""
    with torch.no_grad():
        b = losses.shape[0]
        params = [torch.cat([p.reshape(b, -1) for p in step.values()], 1).isfinite().all(1) for step in trajectory[1:]]
        return torch.isfinite(losses) & torch.stack(params, 1)
