"""A fast batched forward, and support-loss gradient, for chains of linear layers and elementwise activations, for
MAML's task-parallel path.

``torch.func.vmap`` over ``functional_call`` works for any module but pays per-call costs (re-parametrising the
module, batching rules) that dominate small networks such as the MAML paper's sinusoid MLP. For a network that is a
chain of ``nn.Linear`` layers and elementwise modules, :func:`batched_chain` builds a forward that runs each task's
own weights with one batched matmul per layer, the same numbers as ``vmap`` at a fraction of its overhead, and
:func:`batched_chain_grads` the inner loop's gradient of the support loss written out layer by layer (backpropagation
by hand, in differentiable operations, so the outer loop still differentiates through it), which saves the autograd
engine's per-call cost of ``torch.autograd.grad(create_graph=True)`` in every inner step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.functional.episode import full_precision, unscaled

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity,
               nn.Dropout)

# d(loss)/d(input) of an elementwise module from d(loss)/d(output) ``d``, its input ``z`` and output ``h``: PyTorch's
# own backward kernels, the ones autograd runs for these modules (single fused ops, with their own derivatives for
# the outer loop). Modules not listed here (GELU, Dropout, ...) make the gradient fall back to autograd.
_aten = torch.ops.aten
_DERIVATIVES: dict[type, Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]] = {
    nn.ReLU: lambda m, d, z, h: _aten.threshold_backward(d.to(h.dtype), h, 0),
    nn.LeakyReLU: lambda m, d, z, h: _aten.leaky_relu_backward(d.to(h.dtype), z, m.negative_slope, False),
    nn.Tanh: lambda m, d, z, h: _aten.tanh_backward(d.to(h.dtype), h),
    nn.Sigmoid: lambda m, d, z, h: _aten.sigmoid_backward(d.to(h.dtype), h),
    nn.Identity: lambda m, d, z, h: d,
}

BatchedForward = Callable[[dict[str, Tensor], Tensor], Tensor]
BatchedGrads = Callable[[dict[str, Tensor], Tensor, Tensor, float, bool], Optional[tuple[dict[str, Tensor], Tensor]]]


def _plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` runs ``cls.forward`` untouched: no subclass forward, no hooks, no parametrization."""
    return (type(module).forward is cls.forward and not module._forward_hooks and not module._forward_pre_hooks
            and not hasattr(module, "parametrizations"))


def _steps(module: nn.Module, names: dict[int, str]) -> Optional[list]:
    """The chain as ``(kind, layer, weight name, bias name)`` steps, every use of a module in order (a layer applied
    twice appears twice); weights are named by ``names`` (``id(parameter) -> name``), so a parameter shared by two
    places is one entry of ``params`` and its gradient the sum over its uses."""
    from lightning_meta.models import Backbone

    if isinstance(module, nn.Linear):
        if not _plain(module, nn.Linear):
            return None
        bias = names[id(module.bias)] if module.bias is not None else None
        return [("linear", module, names[id(module.weight)], bias)]
    if isinstance(module, ELEMENTWISE):
        cls = next(c for c in ELEMENTWISE if isinstance(module, c))
        return [("elementwise", module, None, None)] if _plain(module, cls) else None
    if isinstance(module, nn.Flatten):
        ok = (module.start_dim, module.end_dim) == (1, -1) and _plain(module, nn.Flatten)
        return [("flatten", module, None, None)] if ok else None
    if type(module) is nn.Sequential:
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        children = [_steps(child, names) for child in module]  # every use, duplicates included
        return None if any(s is None for s in children) else [step for s in children for step in s or ()]
    if isinstance(module, Backbone) and type(module).forward is Backbone.forward:
        parts = [_steps(module.features, names)]
        if module.head is not None:
            parts.append(_steps(module.head, names))
        return None if any(p is None for p in parts) else [step for p in parts for step in p or ()]
    return None


def _chain(module: nn.Module) -> Optional[list]:
    return _steps(module, {id(p): n for n, p in module.named_parameters()})


def _linear(params: dict[str, Tensor], layer: nn.Linear, wname: str, bname: Optional[str], h: Tensor) -> Tensor:
    """One linear layer on ``h [B, n, ..., F]`` with each task's own weights (``[B, O, F]``, or the shared ``[O, F]``):
    the example dimensions are flattened into one, so the task dimension always meets the task's weights (a
    broadcasting matmul of ``[B, n, L, F]`` with ``[B, F, O]`` would pair the tasks with the examples)."""
    weight = params.get(wname, layer.weight)
    bias = params.get(bname, layer.bias) if bname is not None else None
    flat = h.reshape(h.shape[0], -1, h.shape[-1])  # [B, n * ..., F]
    if weight.dim() == 3:
        out = (torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)) if bias is not None and bias.dim() == 2
               else torch.bmm(flat, weight.transpose(1, 2)))
    else:
        out = torch.matmul(flat, weight.t())
    if bias is not None and not (weight.dim() == 3 and bias.dim() == 2):
        out = out + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
    return out.reshape(*h.shape[:-1], out.shape[-1])


def batched_chain(module: nn.Module) -> Optional[BatchedForward]:
    """``forward(params, x)`` for task-stacked parameters (``[B, ...]``, by name as in ``module.named_parameters()``;
    names missing from ``params`` use the module's own, shared weights) and inputs ``x [B, n, ...]``, or ``None``
    when ``module`` is not a chain of plain linear layers, elementwise modules and ``Flatten`` (a subclass with its
    own ``forward``, a hook or a parametrization also gives ``None``: only ``vmap`` runs those faithfully).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> params = {n: p.expand(5, *p.shape) for n, p in net.named_parameters()}
        >>> x = torch.randn(5, 7, 3)
        >>> torch.allclose(batched_chain(net)(params, x), net(x), atol=1e-6)
        True
        >>> batched_chain(nn.Sequential(nn.Conv2d(1, 1, 3))) is None
        True
    """
    steps = _chain(module)
    if steps is None:
        return None

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for kind, layer, wname, bname in steps:
            if kind == "flatten":
                h = h.flatten(2)
            elif kind == "elementwise":
                h = _apply(layer, h)
            else:
                h = _linear(params, layer, wname, bname, h)
        return h

    return forward


def _apply(layer: nn.Module, h: Tensor) -> Tensor:
    """An elementwise module on ``h``, never in place: an in-place activation (``LeakyReLU(inplace=True)``) would
    overwrite its input, which the previous module's backward may need (``Tanh`` keeps its output)."""
    return layer(h.clone()) if getattr(layer, "inplace", False) else layer(h)


def _loss_and_grad(out: Tensor, y: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Per-task losses ``[B]`` as :func:`~lightning_meta.functional.episode.per_task_loss` computes them (MSE for
    float targets, cross-entropy for labels; each the mean over the task's n examples), and ``scale`` times the
    gradient of their sum with respect to ``out``, in ``out``'s dtype."""
    n = y.shape[1]
    if y.is_floating_point():
        squeeze = out.shape != y.shape and out.shape[-1] == 1 and out.dim() == y.dim() + 1
        diff = full_precision(out.squeeze(-1) if squeeze else out) - full_precision(y)
        with torch.no_grad():
            losses = diff.pow(2).flatten(1).mean(-1)  # over each task's examples (and their target dimensions)
        d = diff * (2.0 * scale / diff[0].numel())
        d = d.unsqueeze(-1) if squeeze else d
    else:
        logits = full_precision(out)
        with torch.no_grad():
            flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            losses = flat.view(y.shape).mean(-1)
        d = torch.softmax(logits, -1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        d = d * (scale / n)
    return losses, d.to(out.dtype)


def _accumulate(grads: dict[str, Tensor], name: str, g: Tensor) -> None:
    """A parameter used in several places gets the sum of the gradients of its uses."""
    grads[name] = grads[name] + g if name in grads else g


def batched_chain_grads(module: nn.Module) -> Optional[BatchedGrads]:
    """The inner step's gradients for :func:`batched_chain`'s networks, by backpropagation written out layer by
    layer, or ``None`` when a module in the chain has no formula here (GELU, SiLU, ELU, Softplus, Dropout).

    ``grads(params, x, y, scale, create_graph)`` returns ``(gradients of the summed per-task support losses with
    respect to params, per-task losses [B])`` -- what :func:`~lightning_meta.functional.scaled_grad` returns for
    ``per_task_loss(forward(params, x), y)`` -- for inputs ``[B, n, ...]`` of any number of feature dimensions (a
    sequence ``[B, n, L, F]`` through linear layers), or ``None`` for a chain without a linear layer. The gradients are built from
    differentiable operations, so with ``create_graph`` the outer loop differentiates through them (second order);
    without, they are computed without a graph (first order). ``scale`` is the float16 loss scale: the backward pass
    runs on ``scale * loss`` and the gradients are divided by ``scale`` in the wider of float32 and their dtype.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> params = {n: p.expand(5, *p.shape) for n, p in net.named_parameters()}
        >>> x, y = torch.randn(5, 7, 3), torch.randint(0, 2, (5, 7))
        >>> grads, losses = batched_chain_grads(net)(params, x, y, 1.0, False)
        >>> from lightning_meta.functional.episode import per_task_loss
        >>> reference = torch.autograd.grad(per_task_loss(batched_chain(net)(params, x), y).sum(), list(params.values()))
        >>> all(torch.allclose(grads[k], g, atol=1e-6) for k, g in zip(params, reference))
        True
    """
    steps = _chain(module)
    if steps is None or any(kind == "elementwise" and type(layer) not in _DERIVATIVES for kind, layer, _, _ in steps):
        return None
    first_linear = next((i for i, (kind, _, _, _) in enumerate(steps) if kind == "linear"), None)

    def grads(params: dict[str, Tensor], x: Tensor, y: Tensor, scale: float, create_graph: bool):
        if first_linear is None:
            return None
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            saved, h = _chain_forward(steps, params, x)
            losses, d = _loss_and_grad(h, y, scale)
            out = _chain_backward(steps, params, saved, d, first_linear)
        grads = {k: out[k] if k in out else torch.zeros_like(p) for k, p in params.items()}  # zeros: unused by the loss
        return {k: unscaled(g, scale) if scale != 1.0 else g.to(params[k].dtype) for k, g in grads.items()}, losses

    return grads


def _chain_forward(steps: list, params: dict[str, Tensor], x: Tensor) -> tuple[list, Tensor]:
    """The chain's forward pass, keeping what its backward needs: ``(saved per step, outputs)``."""
    h, saved = x, list[Any]()
    for kind, layer, wname, bname in steps:
        if kind == "flatten":
            saved.append(h.shape)
            h = h.flatten(2)
        elif kind == "elementwise":
            z, h = h, _apply(layer, h)
            saved.append((z, h))
        else:
            saved.append(h)
            h = _linear(params, layer, wname, bname, h)
    return saved, h


def _chain_backward(steps: list, params: dict[str, Tensor], saved: list, d: Tensor, first_linear: int) -> dict:
    """Backpropagate ``d`` (the loss gradient at the outputs) down to the first linear layer: the gradients of the
    parameters in ``params`` (a parameter used in several places gets the sum over its uses). A linear layer's
    example dimensions are flattened into one, as :func:`_linear` runs it."""
    out: dict[str, Tensor] = {}
    for i in range(len(steps) - 1, first_linear - 1, -1):
        kind, layer, wname, bname = steps[i]
        if kind == "flatten":
            d = d.reshape(saved[i])
        elif kind == "elementwise":
            d = _DERIVATIVES[type(layer)](layer, d, *saved[i])
        else:
            weight = params.get(wname, layer.weight)
            flat_d = d.reshape(d.shape[0], -1, d.shape[-1])  # [B, n * ..., O]
            if wname in params:
                h = saved[i]
                _accumulate(out, wname, torch.bmm(flat_d.transpose(1, 2), h.reshape(h.shape[0], -1, h.shape[-1])))
            if bname in params:
                _accumulate(out, bname, flat_d.sum(1))
            if i > first_linear:
                w = weight if weight.dim() == 3 else weight.expand(d.shape[0], *weight.shape)
                d = torch.bmm(flat_d, w).reshape(*d.shape[:-1], w.shape[-1])
    return out
