from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def per_task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean loss of each task ``[...]``: cross-entropy for integer labels, MSE for float targets.

    ``outputs`` are logits ``[..., M, N]`` or predictions ``[..., M]`` / ``[..., M, 1]``; ``targets`` are ``[..., M]``.

    Example:
        >>> per_task_loss(torch.tensor([[[0., 10.], [10., 0.]]]), torch.tensor([[1, 0]])).shape
        torch.Size([1])
        >>> per_task_loss(torch.tensor([[1.], [3.]]), torch.tensor([1., 1.]))
        tensor(2.)
    """
    if targets.is_floating_point():
        if outputs.shape[-1] == 1 and outputs.dim() == targets.dim() + 1:
            outputs = outputs.squeeze(-1)
        return (outputs.float() - targets.float()).pow(2).mean(-1)
    logits = outputs.float()
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape).mean(-1)


def episode_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The meta-loss: the mean over tasks of :func:`per_task_loss`."""
    return per_task_loss(outputs, targets).mean()


def episode_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Query accuracy of each task ``[...]`` from logits ``[..., M, N]`` and labels ``[..., M]``.

    Example:
        >>> episode_accuracy(torch.tensor([[[0., 1.], [1., 0.], [1., 0.]]]), torch.tensor([[1, 0, 1]]))
        tensor([0.6667])
    """
    return (logits.argmax(-1) == targets).float().mean(-1)
