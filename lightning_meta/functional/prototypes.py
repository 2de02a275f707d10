from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def class_prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means of support embeddings (Snell et al. 2017, eq. 1).

    Args:
        embeddings: ``[..., S, D]`` support embeddings.
        labels: ``[..., S]`` labels in ``0..n_way-1``.
    Returns:
        ``[..., n_way, D]`` prototypes.

    Example:
        >>> class_prototypes(torch.tensor([[0., 0.], [2., 2.], [5., 1.]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1., 1.],
                [5., 1.]])
    """
    onehot = F.one_hot(labels, n_way).to(embeddings.dtype)  # [..., S, N]
    sums = onehot.transpose(-1, -2) @ embeddings  # [..., N, D]
    return sums / onehot.sum(-2).clamp_min(1).unsqueeze(-1)


def ragged_prototypes(embeddings: Tensor, labels: Tensor, tasks: Tensor, ways: Sequence[int]) -> Tensor:
    """Class means of the support embeddings of tasks of different shapes, concatenated (a ragged meta-batch).

    Args:
        embeddings: ``[sum S_i, D]`` support embeddings, task after task.
        labels: ``[sum S_i]`` labels, ``0..ways[i]-1`` within task ``i``.
        tasks: ``[sum S_i]`` the task of each row.
        ways: ``N_i`` per task.
    Returns:
        ``[B, N_max, D]`` prototypes; the rows past a task's ``N_i`` classes are zero.

    Example:
        >>> z = torch.tensor([[0., 0.], [2., 2.], [5., 1.], [1., 1.], [3., 3.]])
        >>> ragged_prototypes(z, torch.tensor([0, 0, 1, 0, 0]), torch.tensor([0, 0, 0, 1, 1]), [2, 1])
        tensor([[[1., 1.],
                 [5., 1.]],
        <BLANKLINE>
                [[2., 2.],
                 [0., 0.]]])
    """
    n_max = max(ways)
    slots = tasks * n_max + labels  # [sum S_i]: each row's (task, class) cell
    sums = embeddings.new_zeros(len(ways) * n_max, embeddings.shape[-1]).index_add(0, slots, embeddings)
    counts = torch.bincount(slots, minlength=len(ways) * n_max).to(embeddings.dtype)
    return (sums / counts.clamp_min(1).unsqueeze(-1)).view(len(ways), n_max, -1)  # [B, N_max, D]
