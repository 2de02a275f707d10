"""ANIL (Raghu et al., ICLR 2020): MAML that adapts only the head."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from lightning_meta.functional.engine import batch_norms, norms_in_float32, support_statistics
from lightning_meta.learners.maml import MAML


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., ICLR 2020): adapt only the head; the body runs once per task, never inside
    the inner loop.

    The backbone needs ``forward_features(x)`` and a ``head`` module (as ``Conv4``, ``MLP`` and ``ResNet12`` with
    ``out_features`` have). The body embeds each task's support set and queries, with batch norm as ``batch_norm``
    says (the queries normalised with the support's statistics, or their own), exactly as :meth:`adapt` runs it, so
    evaluation measures what deployment gets (all tasks in one ``vmap`` call on a GPU, see :meth:`encode`); only
    ``head`` is adapted, by ``vmap`` over the tasks, and the body's backward runs once for the meta-batch (so ANIL
    does not stream).

    Example:
        >>> from lightning_meta import Episode
        >>> from lightning_meta.models import MLP
        >>> anil = ANIL(MLP(8, (16,), 3), inner_lr=0.5, inner_steps=2)
        >>> ep = Episode(torch.randn(2, 6, 8), torch.arange(3).repeat(2, 2), torch.randn(2, 3, 8), torch.arange(3).repeat(2, 1))
        >>> anil(ep).shape, anil.adapted_names
        (torch.Size([2, 3, 3]), ['weight', 'bias'])
    """

    def __init__(self, backbone: nn.Module, *args, **kwargs) -> None:
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Module) or not callable(getattr(backbone, "forward_features", None)):
            raise ValueError(
                "ANIL adapts only the head: the backbone needs a `head` module and a `forward_features(x)` method "
                "(e.g. Conv4(out_features=N)); got a backbone without them."
            )
        super().__init__(backbone, *args, **kwargs)

    def adapted_module(self) -> nn.Module:
        return cast(nn.Module, self.backbone.head)

    @property
    def streams(self) -> bool:
        return False

    def encode(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """The body on each task's support set and queries ``[B, n, ...]`` -> ``[B, n, D]``: the support with its own
        batch statistics, the queries with the support's (``batch_norm="support"``) or their own.

        ``task_parallel`` decides here too: ``"vmap"`` runs every task in one vmapped call (a single batched
        convolution per layer), ``"loop"`` one call per task, and ``"auto"`` vmap on a GPU and the loop on a CPU
        (where the vmapped body is slower for Conv4 and per-task activations stay cache-sized; figures in the
        README). Under autocast batch norm runs in float32, as in the inner loop."""
        parallel = self.hparams.task_parallel
        use_vmap = parallel == "vmap" or (parallel == "auto" and support_x.is_cuda)
        body = cast(Callable[[Tensor], Tensor], self.backbone.forward_features)

        if use_vmap:
            batched = self.compiled("body (vmap)", torch.func.vmap(body, randomness="different"))
        else:
            one = self.compiled("body (one task)", body)

        def run(x: Tensor) -> Tensor:
            return batched(x) if use_vmap else torch.stack([one(t) for t in x])

        norms = batch_norms(self.backbone)  # derived on each call: a copied or converted backbone runs its own
        with norms_in_float32(norms):
            if self.batch_norm == "transductive" or not norms:
                return run(support_x), run(query_x)
            s = support_x.shape[1]  # one pass: the support rows are normalised by their own statistics anyway
            with support_statistics(norms, s):
                both = run(torch.cat([support_x, query_x], 1))
            return both[:, :s], both[:, s:]
