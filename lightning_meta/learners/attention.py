"""AttentionLearner: a transformer that reads the labelled support set and the queries and predicts in one pass."""

from __future__ import annotations

import math
from typing import Any, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta._checks import check_embedding_width, check_int
from lightning_meta.compile import eager_for_ragged
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.functional import class_prototypes
from lightning_meta.functional.prototypes import ragged_prototypes
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

    A :class:`~lightning_meta.data.RaggedEpisode` (tasks of different ways and shots): the backbone embeds its real
    examples in one call; each task's ``N_i + S_i + M_i`` tokens are padded to ``[B, T_max, D]`` and an attention mask
    keeps every task's tokens among its own (padding is never attended to); logits ``[B, M_max, N_max]``, ``-inf``
    outside each task's cells.

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

    accepts_ragged = True  # RaggedEpisode meta-batches: each task on its own examples and classes

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

    def check_episode(self, batch: Union[Episode, RaggedEpisode]) -> int:
        n_way = super().check_episode(cast(Any, batch))
        if isinstance(batch, RaggedEpisode) and n_way > self.max_way:
            task = batch.ways.index(n_way)
            raise ValueError(
                f"Task {task} of this ragged meta-batch has {n_way} classes but the AttentionLearner was built for at "
                f"most max_way={self.max_way}: cap the variable episodes' ways at {self.max_way} (e.g. "
                f"VariableEpisodes(max_way={self.max_way})) or build it with max_way>={n_way}."
            )
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
        return self._run_masked(tokens, self._mask(n_context, tokens.shape[1] - n_context, tokens.device))

    def _build_input(self, width: int) -> None:
        self.input = nn.Linear(width, self.hparams.dim).to(self.device)
        self.hparams.embedding_dim = width  # saved: the checkpoint loads without a forward

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None)
        rules = getattr(datamodule, "variable_episodes", None)
        ways = [getattr(datamodule, name, 0) for name in ("n_way", "train_way")]
        if rules is not None and None in ways and rules.max_way > self.max_way:  # named now, not mid-epoch on one rank
            raise ValueError(
                f"The data module's variable episodes have up to max_way={rules.max_way} ways, but the "
                f"AttentionLearner was built for at most max_way={self.max_way}: build it with "
                f"max_way={rules.max_way}, or lower VariableEpisodes(max_way=...) to {self.max_way}.")
        if stage == "fit" and self.input is None:  # before the optimizer is built, so that it trains the projection
            self._build_input(embedding_width_from_data(self, self.backbone, "embedding_dim"))

    def forward_episode(self, batch: Union[Episode, RaggedEpisode]) -> Tensor:
        if isinstance(batch, RaggedEpisode):
            if self.input is None:
                self._build_input(infer_embedding_width(self.backbone, batch.support_x[0]))
            eager_for_ragged(self, "episode outputs")
            return self.ragged_outputs(batch)
        sx, sy, qx, _ = batch
        if self.input is None:  # outside fit, with a backbone that states no width: one forward of an input
            self._build_input(infer_embedding_width(self.backbone, sx[0, 0]))
        n_way = 0 if sy.is_floating_point() else int(sy.max()) + 1
        return self.compiled("episode outputs", self.episode_outputs)(sx, sy, qx, n_way)

    def _project(self, x: Tensor) -> Tensor:
        """Backbone embeddings of inputs ``[n, ...]`` projected to the transformer's width: ``[n, dim]``."""
        features = self.backbone(x).flatten(1)
        check_embedding_width(features)
        projection = cast(nn.Linear, self.input)  # built by forward_episode or setup when embedding_dim was None
        if features.shape[1] != projection.in_features:
            raise ValueError(
                f"The backbone gives embeddings of size {features.shape[1]}, but the AttentionLearner was built with "
                f"embedding_dim={projection.in_features}: pass embedding_dim={features.shape[1]}."
            )
        return projection(features)

    def episode_outputs(self, sx: Tensor, sy: Tensor, qx: Tensor, n_way: int) -> Tensor:
        """Query logits ``[B, M, N]`` (``n_way`` classes) or predictions shaped like the targets (regression,
        ``n_way`` unused): a pure tensor function (compiled with ``compile=True``)."""
        b, s, m = sx.shape[0], sx.shape[1], qx.shape[1]
        e = self._project(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]))
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

    def ragged_outputs(self, batch: RaggedEpisode) -> Tensor:
        """Query logits ``[B, M_max, N_max]`` of a ragged meta-batch (``-inf`` outside each task's ``[M_i, N_i]``
        cells): each task's examples through the backbone on their own (batch norm per task, as a meta-batch of one),
        the tokens of :meth:`episode_outputs` per task, task ``i``'s at positions ``0..T_i-1`` of row ``i`` of
        ``[B, T_max, D]`` (its N_i classes, S_i support examples, M_i queries), masked so that a task's tokens attend
        only to its own as in a meta-batch of one; a padding position attends only to itself and is never read."""
        ways, s_tasks, q_tasks = batch.ways, batch.task_index("support"), batch.task_index("query")
        support, query = batch.embed_tasks(self._project)  # each task's examples on their own: [sum S_i, dim], ...
        query = query + self.markers[2]
        classes = ragged_prototypes(support, batch.support_y, s_tasks, ways) + self.markers[0]  # [B, N_max, dim]
        support = support + self.label(classes[s_tasks, batch.support_y]) + self.markers[1]
        dev = support.device
        n, s, m = (torch.tensor(v, device=dev) for v in (ways, batch.support_sizes, batch.query_sizes))
        context, length = n + s, n + s + m  # [B]: tokens a task's tokens attend to; tokens of a task
        c_tasks = torch.repeat_interleave(torch.arange(batch.num_tasks, device=dev), n)
        c_pos = torch.arange(len(c_tasks), device=dev) - (torch.cumsum(n, 0) - n)[c_tasks]  # 0..N_i-1
        s_pos, q_pos = n[s_tasks] + batch.row_index("support"), context[q_tasks] + batch.row_index("query")
        rows = torch.cat([c_tasks, s_tasks, q_tasks]), torch.cat([c_pos, s_pos, q_pos])
        t_max = int(length.max())
        tokens = support.new_zeros(batch.num_tasks, t_max, support.shape[1]).index_put(
            rows, torch.cat([classes[c_tasks, c_pos], support, query]))  # [B, T_max, dim]
        pos = torch.arange(t_max, device=dev)
        row, key = pos[None, :, None], pos[None, None, :]  # [1, T, 1], [1, 1, T]
        c, t = context[:, None, None], length[:, None, None]
        queries = (row >= c) & (row < t) & (key >= c) & (key < t)  # [B, T, T]: a task's query-query block
        mask = ((row < t) & (key < c)) | (queries & ((key == row) | self.query_attention)) | ((row >= t) & (key == row))
        out = self._run_masked(tokens, mask[:, None])  # [B, T_max, dim]
        class_out = out[:, : batch.num_ways]  # [B, N_max, dim]: past a task's N_i, other tokens, masked below
        query_out = batch.pad(out[q_tasks, q_pos])  # [B, M_max, dim]
        logits = (query_out @ class_out.transpose(1, 2)).float() / math.sqrt(out.shape[-1])  # [B, M_max, N_max]
        own = batch.mask()[:, :, None] & batch.way_mask()[:, None, :]
        return logits.masked_fill(~own, float("-inf")) + self._unused(self.target, self.readout)

    def _run_masked(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The transformer on tokens ``[B, T, dim]`` under a boolean mask ``[T, T]`` or ``[B, 1, T, T]``."""
        for block in self.blocks:
            tokens = block(tokens, mask)
        return self.norm(tokens)

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
