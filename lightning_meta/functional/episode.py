"""Per-task losses and accuracies of episodes: the numbers every learner and metric reduces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def full_precision(t: Tensor) -> Tensor:
    """``t`` in float32 when it is float16 or bfloat16 (losses are reduced in full precision); float32 and float64
    as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_task_loss(outputs: Tensor, targets: Tensor, target_ndim: int = 0) -> Tensor:
    """Mean loss of each task ``[...]``: cross-entropy for integer labels, MSE for float targets.

    ``outputs`` are logits ``[..., M, N]`` or predictions shaped like the targets; ``targets`` are ``[..., M]`` labels
    or scalar targets, or ``[..., M, *D]`` vector targets with ``target_ndim = len(D)`` trailing dimensions (e.g.
    ``[B, M, 2]`` with ``target_ndim=1`` for two-dimensional regression). A task's MSE is the mean over its M examples
    and their D outputs. Predictions ``[..., M, 1]`` for scalar targets ``[..., M]`` are taken as ``[..., M]``.

    Example:
        >>> per_task_loss(torch.tensor([[[0., 10.], [10., 0.]]]), torch.tensor([[1, 0]])).shape
        torch.Size([1])
        >>> per_task_loss(torch.tensor([[1.], [3.]]), torch.tensor([1., 1.]))
        tensor(2.)
        >>> per_task_loss(torch.zeros(4, 5, 2), torch.ones(4, 5, 2), target_ndim=1).shape   # 4 tasks of 2-D targets
        torch.Size([4])
    """
    if targets.is_floating_point():
        if outputs.shape != targets.shape and outputs.shape[-1] == 1 and outputs.dim() == targets.dim() + 1:
            outputs = outputs.squeeze(-1)
        if outputs.shape != targets.shape:
            raise ValueError(f"Expected predictions shaped like the targets {tuple(targets.shape)}, but got "
                             f"{tuple(outputs.shape)}: the model's output size must equal the target size.")
        error = (full_precision(outputs) - full_precision(targets)).pow(2)
        return error.flatten(error.dim() - 1 - target_ndim).mean(-1)
    logits = full_precision(outputs)
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape).mean(-1)


def target_ndim(targets: Tensor, batch_dims: int) -> int:
    """Trailing target dimensions of each example: 0 for labels and scalar targets, 1 for ``[.., M, D]`` targets."""
    return targets.dim() - batch_dims - 1 if targets.is_floating_point() else 0


def like_targets(outputs: Tensor, targets: Tensor) -> Tensor:
    """Regression predictions ``[.., M, 1]`` for scalar targets ``[.., M]`` as ``[.., M]``; others unchanged."""
    scalar = targets.is_floating_point() and outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1
    return outputs.squeeze(-1) if scalar else outputs


def msl_weights(steps: int, epochs: int, epoch: int) -> Tensor:
    """MAML++ multi-step loss weights ``[steps]`` at ``epoch`` (Antoniou et al. 2019, section 4): uniform at first,
    annealed over ``epochs`` epochs towards the last step, every other step keeping at least ``0.03 / steps``.

    Example:
        >>> msl_weights(3, 10, 0).tolist(), msl_weights(2, 2, 5).tolist()
        ([0.3333333432674408, 0.3333333432674408, 0.3333333432674408], [0.014999999664723873, 0.9850000143051147])
    """
    decay, floor = 1.0 / steps / epochs, 0.03 / steps
    w = torch.full((steps,), max(1.0 / steps - epoch * decay, floor))
    w[-1] = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w


def episode_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Query accuracy of each task ``[...]`` from logits ``[..., M, N]`` and labels ``[..., M]``.

    Example:
        >>> episode_accuracy(torch.tensor([[[0., 1.], [1., 0.], [1., 0.]]]), torch.tensor([[1, 0, 1]]))
        tensor([0.6667])
    """
    return (logits.argmax(-1) == targets).float().mean(-1)


def unscaled(grad: Tensor, scale: float) -> Tensor:
    """``grad / scale`` in the wider of float32 and ``grad``'s dtype: a float16 gradient is unscaled in float32 (its
    small values would underflow again), a float64 one in float64 (float32 would round it to 1e-8).

    Example:
        >>> g = torch.tensor([1.0 + 1e-12], dtype=torch.float64) * 1024
        >>> unscaled(g, 1024.0).item() - 1.0 > 0          # float32 would have rounded it to exactly 1.0
        True
    """
    return grad.to(torch.promote_types(grad.dtype, torch.float32)) / scale if scale != 1.0 else grad

