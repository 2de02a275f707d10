"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta._checks import check_choice, check_embedding_width
from lightning_meta.data.episode import Episode
from lightning_meta.functional import class_prototypes, cosine_logits, squared_euclidean
from lightning_meta.learners.base import MetaLearner, TaskPredictor

DISTANCES = ("euclidean", "cosine")


class ProtoNet(MetaLearner):
    """Embed every image; each class's prototype is the mean of its support embeddings; a query's logits are its
    negative squared Euclidean distances to the prototypes (or scaled cosine similarities).

    Shapes: support ``[B, N*K, C, H, W]`` -> embeddings ``[B, N*K, D]`` -> prototypes ``[B, N, D]``;
    queries ``[B, M, C, H, W]`` -> logits ``[B, M, N]``. All tasks of a meta-batch go through the backbone in one call.

    Args:
        backbone: maps ``[n, ...]`` inputs to embeddings ``[n, D]`` (e.g. ``Conv4()``).
        distance: ``"euclidean"`` (the paper) or ``"cosine"``.
        scale: initial temperature of cosine logits; learned when ``learn_scale``.
        **kwargs: optimizer options of :class:`MetaLearner`.

    Example:
        >>> from lightning_meta.models import MLP
        >>> net = ProtoNet(MLP(4, (16,)))
        >>> ep = Episode(torch.randn(2, 6, 4), torch.arange(3).repeat_interleave(2).repeat(2, 1),
        ...              torch.randn(2, 9, 4), torch.arange(3).repeat_interleave(3).repeat(2, 1))
        >>> net(ep).shape
        torch.Size([2, 9, 3])
        >>> net.adapt(ep.support_x[0], ep.support_y[0])(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        scale: float = 10.0,
        learn_scale: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("distance", distance, DISTANCES)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        self.backbone = self.plain_backbone(backbone)
        self.distance = distance
        # only cosine logits use the scale: a trainable parameter outside the loss would stop DDP
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale and distance == "cosine")

    def check_episode(self, batch: Episode) -> int:
        n_way = super().check_episode(batch)
        if batch.is_regression:
            raise ValueError(
                "ProtoNet classifies by distance to class prototypes, but this episode has float (regression) "
                "targets. Use MAML or AttentionLearner for regression."
            )
        return n_way

    def embed(self, x: Tensor) -> Tensor:
        """Flat float32 embeddings ``[n, D]`` (``D = 0`` is refused)."""
        z = self.backbone(x).flatten(1).float()
        check_embedding_width(z)
        return z

    def logits(self, queries: Tensor, prototypes: Tensor) -> Tensor:
        if self.distance == "euclidean":
            return -squared_euclidean(queries, prototypes)
        return cosine_logits(queries, prototypes, self.scale)

    def forward_episode(self, batch: Episode) -> Tensor:
        sx, sy, qx, _ = batch
        return self.compiled("episode logits", self.episode_logits)(sx, sy, qx, int(sy.max()) + 1)

    def episode_logits(self, sx: Tensor, sy: Tensor, qx: Tensor, n_way: int) -> Tensor:
        """Query logits ``[B, M, N]`` of a meta-batch with ``n_way`` classes: a pure tensor function (compiled with
        ``compile=True``)."""
        b, s, m = sx.shape[0], sx.shape[1], qx.shape[1]
        z = self.embed(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]))  # [B*(S+M), D]
        support, query = z[: b * s].view(b, s, -1), z[b * s :].view(b, m, -1)
        return self.logits(query, class_prototypes(support, sy, n_way))  # [B, M, N]

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        batch, n_way = self._single_task(support_x, support_y)
        with self.evaluating():
            prototypes = class_prototypes(self.embed(batch.support_x[0]), batch.support_y[0], n_way)
        if not torch.isfinite(prototypes).all():
            raise ValueError("The backbone gives non-finite (NaN or infinite) embeddings for this support set: check "
                             "the inputs and the backbone's weights.")

        def predict(query_x: Tensor) -> Tensor:
            with self.evaluating():
                return self.logits(self.embed(self.as_inputs(query_x, "query_x")), prototypes)

        return TaskPredictor(predict, n_way)
