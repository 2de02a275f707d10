"""Classifiers fitted on one task's support embeddings at test time (the transfer baselines): multinomial logistic
regression (Tian et al. 2020, "Rethinking Few-Shot Image Classification") and a linear head trained by gradient steps
(Chen et al. 2019, "A Closer Look at Few-shot Classification": Baseline). Pure tensor functions, no Lightning.

Shapes: support embeddings ``[S, D]`` with labels ``[S]`` in ``0..N-1`` -> a head ``(weight [N, D], bias [N])``;
``linear_logits(head, queries [M, D]) -> [M, N]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_normalize(z: Tensor) -> Tensor:
    """Rows scaled to unit length (what RFS feeds its logistic regression)."""
    return F.normalize(z, dim=-1)


def fit_logistic(support: Tensor, labels: Tensor, n_way: int, c: float = 1.0, max_iter: int = 100,
                 tolerance: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression with an L2 penalty, the objective of scikit-learn's ``LogisticRegression(C=c)``
    (``sum of log-losses + ||W||^2 / (2c)``, intercept not penalised), minimised by L-BFGS in float64 on the
    embeddings' device. Returns ``(weight [N, D], bias [N])`` in the embeddings' dtype. The caller L2-normalises the
    embeddings when it wants RFS's recipe.

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> w, b = fit_logistic(z, torch.tensor([0, 0, 1, 1]), 2)
        >>> linear_logits((w, b), z).argmax(1).tolist()
        [0, 0, 1, 1]
    """
    if c <= 0:
        raise ValueError(f"Expected `c` (the inverse regularisation strength) to be > 0, but got {c}.")
    x = support.detach().double()
    y = labels.to(x.device).long()
    weight = torch.zeros(n_way, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(n_way, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=tolerance * 1e-2, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().to(support.dtype), bias.detach().to(support.dtype)


def fit_linear(support: Tensor, labels: Tensor, n_way: int, steps: int = 100, lr: float = 0.01,
               momentum: float = 0.9, weight_decay: float = 1e-3, batch_size: int = 4,
               generator: torch.Generator | None = None, embed: Callable[[Tensor], Tensor] | None = None,
               parameters: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor]:
    """A linear head trained by ``steps`` SGD steps on mini-batches of the support set (Chen et al. 2019's Baseline:
    SGD, lr 0.01, momentum 0.9, weight decay 1e-3, batches of 4), starting from zero weights (so zero steps is the
    untrained head: every class equally likely). Mini-batches are drawn from ``generator`` (a fixed seed by default,
    so a task's head does not depend on the global random state).

    ``support`` holds frozen embeddings ``[S, D]``; or, with ``embed``, inputs that ``embed`` maps to embeddings at
    every step, trained together with the head through ``parameters`` (a copy of a network: fine-tuning it whole).

    Example:
        >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> linear_logits(fit_linear(z, torch.tensor([0, 0, 1, 1]), 2, steps=0), z).abs().max().item()
        0.0
        >>> linear_logits(fit_linear(z, torch.tensor([0, 0, 1, 1]), 2), z).argmax(1).tolist()
        [0, 0, 1, 1]
    """
    x = support.detach() if embed is not None else support.detach().float()
    embed = embed or (lambda v: v)
    y = labels.to(x.device).long()
    with torch.enable_grad():
        width = embed(x[:1]).flatten(1).shape[1]
        weight = torch.zeros(n_way, width, device=x.device, requires_grad=True)
        bias = torch.zeros(n_way, device=x.device, requires_grad=True)
        optimizer = torch.optim.SGD([*parameters, weight, bias], lr=lr, momentum=momentum, weight_decay=weight_decay)
        generator = generator or torch.Generator().manual_seed(0)
        for _ in range(steps):
            pick = torch.randperm(len(x), generator=generator)[:batch_size].to(x.device)
            optimizer.zero_grad()
            F.cross_entropy(embed(x[pick]) @ weight.T + bias, y[pick]).backward()
            optimizer.step()
    return weight.detach().to(support.dtype), bias.detach().to(support.dtype)


def linear_logits(head: tuple[Tensor, Tensor], queries: Tensor) -> Tensor:
    """``queries [..., D] @ weight.T + bias`` -> ``[..., N]``."""
    weight, bias = head
    return queries @ weight.T.to(queries.dtype) + bias.to(queries.dtype)


def cosine_classifier_logits(z: Tensor, weight: Tensor, scale: float | Tensor) -> Tensor:
    """Baseline++ (Chen et al. 2019): ``scale * cos(z, w_c)`` for every class weight ``w_c`` -> ``[n, C]``."""
    return scale * l2_normalize(z) @ l2_normalize(weight).T
