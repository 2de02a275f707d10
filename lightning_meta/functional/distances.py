from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``[..., M, N]`` between ``a [..., M, D]`` and ``b [..., N, D]``.

    Example:
        >>> squared_euclidean(torch.tensor([[0., 0.]]), torch.tensor([[3., 4.], [0., 1.]]))
        tensor([[25.,  1.]])
    """
    return (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)


def cosine_logits(a: Tensor, b: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """``scale * cos(a_i, b_j)`` as ``[..., M, N]``.

    Example:
        >>> cosine_logits(torch.tensor([[1., 0.]]), torch.tensor([[2., 0.], [0., 3.]]), 10.0)
        tensor([[10.,  0.]])
    """
    return scale * (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2))
