"""The MAML inner loop as a pure function of (params, support), built on ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta._checks import check_choice, surely_finite
from lightning_meta.functional.batched import BatchedGrads
from lightning_meta.functional.episode import per_task_loss, target_ndim, unscaled

Params = dict[str, Tensor]
Forward = Callable[[Params, Tensor], Tensor]  # (params, inputs) -> outputs
ENGINES = ("func", "autograd")
LearningRates = Callable[[int], dict[str, Union[Tensor, float]]]


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
