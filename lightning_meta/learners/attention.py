"""AttentionLearner: a transformer that reads the labelled support set and the queries and predicts in one pass."""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta._checks import check_embedding_width, check_int
from lightning_meta.data.episode import Episode
from lightning_meta.functional import class_prototypes
from lightning_meta.learners.base import MetaLearner, TaskPredictor
from lightning_meta.learners.widths import embedding_width_from_data
from lightning_meta.models import embedding_width, infer_embedding_width


class _Block(nn.Module):
    """Pre-norm transformer block on PyTorch's fused ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))  # [B, T, D]
        return x + self.mlp(self.norm2(x))


class AttentionLearner(MetaLearner):
    """Black-box meta-learner: adaptation is a forward pass of a transformer over the support set and the queries.

    Tokens (classification), for N classes, S support and M query examples with backbone embeddings ``e``:

    - N class tokens: the mean embedding of each class's support examples plus a class marker;
    - S support tokens: ``e_i`` plus the embedding of its label, which is its class token (so a label is embedded by
      what its examples look like, never by its number);
    - M query tokens: ``e_j`` plus a learned "unknown label" marker.

    Class and support tokens attend to each other; queries attend to them and to themselves (and to the other
    queries only with ``query_attention=True``). A query's logit for class k is the scaled dot product of its output
    token with class k's output token, so one trained model serves any N up to ``max_way``, its predictions are
    equivariant to relabelling the support classes and invariant to the order of the support set, and no query ever
    sees a query label. Regression: support tokens carry ``(x, y)`` (``e_i`` plus a projection of ``y_i``) and a
    linear head reads each query token.

    Args:
        backbone: maps inputs ``[n, ...]`` to embeddings ``[n, D]``.
        max_way: the largest N accepted.
        dim, depth, heads, dropout: transformer width, blocks, attention heads and dropout.
        query_attention: let queries attend to each other (transductive).
        embedding_dim: D, the backbone's embedding size; read from the backbone when absent (``embedding_dim``,
            timm's ``num_features``), else from one forward of a training input when ``fit`` starts (or of the first
            episode the learner sees).
        target_dim: size of each regression target (1 for scalar targets ``[B, M]``; D for ``[B, M, D]``).

    Example:
        >>> from lightning_meta.models import MLP
        >>> net = AttentionLearner(MLP(4, (16,)), max_way=5, dim=32, heads=4)
        >>> ep = Episode(torch.randn(2, 6, 4), torch.arange(3).repeat_interleave(2).repeat(2, 1),
        ...              torch.randn(2, 9, 4), torch.arange(3).repeat_interleave(3).repeat(2, 1))
        >>> net(ep).shape
        torch.Size([2, 9, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        max_way: int = 20,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        query_attention: bool = False,
        embedding_dim: Optional[int] = None,
        target_dim: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        for name, value, minimum in (("max_way", max_way, 2), ("dim", dim, 1), ("depth", depth, 1), ("heads", heads, 1),
                                     ("target_dim", target_dim, 1)):
            check_int(name, value, minimum)
        if dim % heads:
            raise ValueError(f"Expected `dim` ({dim}) to be divisible by `heads` ({heads}).")
        backbone = self.plain_backbone(backbone)
        embedding_dim = embedding_dim or embedding_width(backbone)
        self.backbone, self.max_way = backbone, max_way
        self.input: Optional[nn.Linear] = nn.Linear(embedding_dim, dim) if embedding_dim else None  # else at fit start
        self.label = nn.Linear(dim, dim)  # embeds a label by its class token
        self.target = nn.Linear(target_dim, dim)  # embeds a regression target
        self.markers = nn.Parameter(torch.randn(3, dim) * 0.02)  # class, support, unknown-label
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.readout = nn.Linear(dim, target_dim)
        self.query_attention = query_attention

    def check_episode(self, batch: Episode) -> int:
        n_way = super().check_episode(batch)
        if n_way > self.max_way:
            raise ValueError(
                f"This episode has {n_way} classes but the AttentionLearner was built for at most max_way="
                f"{self.max_way}: sample at most {self.max_way}-way episodes or build it with max_way>={n_way}."
            )
        size = (batch.support_y.shape[2] if batch.support_y.dim() == 3 else 1) if batch.is_regression else None
        if size is not None and size != self.target.in_features:
            raise ValueError(
                f"This regression episode has targets of size {size} per example, but the AttentionLearner was built "
                f"with target_dim={self.target.in_features}: build it with target_dim={size}."
            )
        return n_way

    def _mask(self, n_context: int, m: int, device) -> Tensor:
        """Boolean ``[T, T]`` attention mask (True = may attend): context tokens see the context; queries see the
        context and themselves (and each other when ``query_attention``)."""
        t = n_context + m
        mask = torch.zeros(t, t, dtype=torch.bool, device=device)
        mask[:, :n_context] = True
        if self.query_attention:
            mask[n_context:, n_context:] = True
        else:
            mask[n_context:, n_context:] = torch.eye(m, dtype=torch.bool, device=device)
        return mask

    def _run(self, tokens: Tensor, n_context: int) -> Tensor:
        mask = self._mask(n_context, tokens.shape[1] - n_context, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, mask)
        return self.norm(tokens)

    def _build_input(self, width: int) -> None:
        self.input = nn.Linear(width, self.hparams.dim).to(self.device)
        self.hparams.embedding_dim = width  # saved: the checkpoint loads without a forward

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.input is None:  # before the optimizer is built, so that it trains the projection
            self._build_input(embedding_width_from_data(self, self.backbone, "embedding_dim"))

    def forward_episode(self, batch: Episode) -> Tensor:
        sx, sy, qx, _ = batch
        if self.input is None:  # outside fit, with a backbone that states no width: one forward of an input
            self._build_input(infer_embedding_width(self.backbone, sx[0, 0]))
        n_way = 0 if sy.is_floating_point() else int(sy.max()) + 1
        return self.compiled("episode outputs", self.episode_outputs)(sx, sy, qx, n_way)

    def episode_outputs(self, sx: Tensor, sy: Tensor, qx: Tensor, n_way: int) -> Tensor:
        """Query logits ``[B, M, N]`` (``n_way`` classes) or predictions shaped like the targets (regression,
        ``n_way`` unused): a pure tensor function (compiled with ``compile=True``)."""
        b, s, m = sx.shape[0], sx.shape[1], qx.shape[1]
        features = self.backbone(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)])).flatten(1)
        check_embedding_width(features)
        projection = cast(nn.Linear, self.input)  # built by forward_episode or setup when embedding_dim was None
        if features.shape[1] != projection.in_features:
            raise ValueError(
                f"The backbone gives embeddings of size {features.shape[1]}, but the AttentionLearner was built with "
                f"embedding_dim={projection.in_features}: pass embedding_dim={features.shape[1]}."
            )
        e = projection(features)
        support, query = e[: b * s].view(b, s, -1), e[b * s :].view(b, m, -1)  # [B, S, D], [B, M, D]
        query = query + self.markers[2]
        if sy.is_floating_point():
            scalar = sy.dim() == 2
            targets = sy.unsqueeze(-1) if scalar else sy  # [B, S, target_dim]
            support = support + self.target(targets.to(support.dtype)) + self.markers[1]
            out = self._run(torch.cat([support, query], 1), s)
            predictions = self.readout(out[:, s:]) + self._unused(self.label, self.markers[0])  # [B, M, target_dim]
            return predictions.squeeze(-1) if scalar else predictions  # shaped like the targets
        classes = class_prototypes(support, sy, n_way) + self.markers[0]  # [B, N, D]
        support = support + self.label(torch.gather(classes, 1, sy.unsqueeze(-1).expand_as(support))) + self.markers[1]
        out = self._run(torch.cat([classes, support, query], 1), n_way + s)  # [B, N+S+M, D]
        class_out, query_out = out[:, :n_way], out[:, n_way + s :]
        logits = (query_out @ class_out.transpose(1, 2)).float() / math.sqrt(out.shape[-1])  # [B, M, N]
        return logits + self._unused(self.target, self.readout)

    @staticmethod
    def _unused(*parts) -> Tensor:
        """Zero, computed from the parameters this episode's mode does not use (classification: the regression target
        embedding and readout; regression: the label embedding and class marker). One model keeps both so it serves
        both kinds of episode; joining the graph with weight zero changes no output or gradient and lets DDP, which
        refuses parameters outside the loss, train either kind."""
        params = [p for part in parts for p in (part.parameters() if isinstance(part, nn.Module) else [part])]
        return cast(Tensor, sum(p.sum() for p in params)) * 0.0

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        batch, n_way = self._single_task(support_x, support_y)

        def predict(query_x: Tensor) -> Tensor:
            with self.evaluating():
                qx = self.as_inputs(query_x, "query_x")[None]
                sy = batch.support_y
                qy = torch.zeros(qx.shape[:2] + sy.shape[2:], dtype=sy.dtype, device=qx.device)
                return self.forward_episode(Episode(batch.support_x, batch.support_y, qx, qy))[0]

        return TaskPredictor(predict, n_way)
