from __future__ import annotations

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
