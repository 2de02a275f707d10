"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017), and the heads fitted at test time on the same
embedding (logistic regression, a fine-tuned linear head or network)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor, nn

from lightning_meta._checks import check_choice, check_embedding_width, check_int, check_positive
from lightning_meta.compile import eager_for_ragged
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.functional import class_prototypes, cosine_logits, squared_euclidean
from lightning_meta.functional.heads import fit_linear, fit_logistic, l2_normalize, linear_logits
from lightning_meta.functional.prototypes import ragged_prototypes
from lightning_meta.learners.base import Batch, MetaLearner, TaskPredictor

DISTANCES = ("euclidean", "cosine")
HEADS = ("prototype", "logistic", "finetune")
Classifier = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]  # (embed inputs, logits of embeddings)


class ProtoNet(MetaLearner):
    """Embed every image; each class's prototype is the mean of its support embeddings; a query's logits are its
    negative squared Euclidean distances to the prototypes (or scaled cosine similarities).

    Shapes: support ``[B, N*K, C, H, W]`` -> embeddings ``[B, N*K, D]`` -> prototypes ``[B, N, D]``;
    queries ``[B, M, C, H, W]`` -> logits ``[B, M, N]``. All tasks of a meta-batch go through the backbone in one call.
    A :class:`~lightning_meta.data.RaggedEpisode` (tasks of different ways and shots) too: its real examples
    ``[sum S_i + sum M_i, ...]`` in one call, each task's prototypes from its own support set, logits
    ``[B, M_max, N_max]`` with ``-inf`` outside each task's ``[M_i, N_i]`` cells.

    Args:
        backbone: maps ``[n, ...]`` inputs to embeddings ``[n, D]`` (e.g. ``Conv4()``, a timm or torchvision model).
        distance: ``"euclidean"`` (the paper) or ``"cosine"``.
        scale: initial temperature of cosine logits; learned when ``learn_scale``.
        head: how a new task is classified, in :meth:`adapt`, validation and test (training always uses prototypes):
            ``"prototype"`` (nearest class mean), ``"logistic"`` (multinomial logistic regression on L2-normalised
            support embeddings, fitted by L-BFGS on the device: Tian et al. 2020's recipe, ``head_c`` its inverse
            regularisation as scikit-learn's ``C``) or ``"finetune"`` (a linear head from zero trained ``head_steps``
            SGD steps on batches of 4 support examples at ``head_lr``: Chen et al. 2019's Baseline; with
            ``finetune_backbone=True`` a copy of the whole network is trained with it, as Dhillon et al. 2020 do).
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

    accepts_ragged = True  # RaggedEpisode meta-batches: each task on its own examples and classes

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        scale: float = 10.0,
        learn_scale: bool = True,
        head: str = "prototype",
        head_steps: int = 100,
        head_lr: float = 0.01,
        head_c: float = 1.0,
        finetune_backbone: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("distance", distance, DISTANCES)
        check_choice("head", head, HEADS)
        check_int("head_steps", head_steps, 0)
        check_positive("head_lr", head_lr)
        check_positive("head_c", head_c)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        self.backbone = self.plain_backbone(backbone)
        self.distance = distance
        # only cosine logits use the scale: a trainable parameter outside the loss would stop DDP
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale and distance == "cosine")

    def check_episode(self, batch: Batch) -> int:
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

    def forward_episode(self, batch: Union[Episode, RaggedEpisode]) -> Tensor:
        if isinstance(batch, RaggedEpisode):
            if self.training or self.hparams.head == "prototype":
                eager_for_ragged(self, "episode logits")
                return self.ragged_logits(batch)
            return batch.pad_outputs([self._classify(self.fit_head(t.support_x, t.support_y, n), t.query_x)
                                      for t, n in zip(batch.tasks(), batch.ways)])  # each task as adapt() fits it
        sx, sy, qx, _ = batch
        n_way = int(sy.max()) + 1
        if self.training or self.hparams.head == "prototype":
            return self.compiled("episode logits", self.episode_logits)(sx, sy, qx, n_way)
        # another head: fitted per task, exactly as adapt() fits it
        return torch.stack([self._classify(self.fit_head(sx[i], sy[i], n_way), qx[i]) for i in range(len(sx))])

    def episode_logits(self, sx: Tensor, sy: Tensor, qx: Tensor, n_way: int) -> Tensor:
        """Query logits ``[B, M, N]`` of a meta-batch with ``n_way`` classes: a pure tensor function (compiled with
        ``compile=True``)."""
        b, s, m = sx.shape[0], sx.shape[1], qx.shape[1]
        z = self.embed(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)]))  # [B*(S+M), D]
        support, query = z[: b * s].view(b, s, -1), z[b * s :].view(b, m, -1)
        return self.logits(query, class_prototypes(support, sy, n_way))  # [B, M, N]

    def ragged_logits(self, batch: RaggedEpisode) -> Tensor:
        """Query logits ``[B, M_max, N_max]`` of a ragged meta-batch, ``-inf`` outside each task's ``[M_i, N_i]``
        cells: each task's real examples through the backbone on their own (:meth:`RaggedEpisode.embed_tasks`: batch
        norm with the task's own statistics, as Meta-Dataset trains one episode per step, and as fast as one task at a
        time on a CPU), each task's prototypes ``[N_i, D]`` from its own support embeddings, each query against its
        own task's prototypes: every task computes exactly what it computes as a meta-batch of one."""
        support, query = batch.embed_tasks(self.embed)  # [sum S_i, D], [sum M_i, D]
        prototypes = ragged_prototypes(support, batch.support_y, batch.task_index("support"), batch.ways)
        logits = self.logits(batch.pad(query), prototypes)  # [B, M_max, N_max]; padded cells masked next
        own = batch.mask()[:, :, None] & batch.way_mask()[:, None, :]
        return logits.masked_fill(~own, float("-inf"))

    def fit_head(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Classifier:
        """The learner's ``head`` fitted on one task's support set ``[S, ...]``: ``(embed, classify)``, where
        ``classify(embed(query_x))`` gives the logits ``[M, N]``. Gradients are enabled where a head needs them, in
        Lightning's validation and test too."""
        head = self.hparams.head
        if head == "finetune" and self.hparams.finetune_backbone:
            return self._finetune_network(support_x, support_y, n_way)
        with self.evaluating():
            z = self.embed(support_x)
        if not torch.isfinite(z).all():
            raise ValueError("The backbone gives non-finite (NaN or infinite) embeddings for this support set: check "
                             "the inputs and the backbone's weights.")
        if head == "prototype":
            prototypes = class_prototypes(z[None], support_y[None], n_way)[0]
            return self.embed, lambda q: self.logits(q, prototypes)
        with self.gradients_enabled():
            z = z.clone()  # a normal tensor for autograd, also when computed in inference mode
            if head == "logistic":
                fitted = fit_logistic(l2_normalize(z), support_y, n_way, c=self.hparams.head_c)
                return self.embed, lambda q: linear_logits(fitted, l2_normalize(q))
            fitted = fit_linear(z, support_y, n_way, steps=self.hparams.head_steps, lr=self.hparams.head_lr)
        return self.embed, lambda q: linear_logits(fitted, q)

    def _finetune_network(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Classifier:
        """A copy of the backbone and a zero-initialised linear head, trained together as :func:`fit_linear` trains a
        head (evaluation mode: batch-norm statistics stay the trained ones)."""
        with self.gradients_enabled():  # the copy too: a copy made in inference mode could not be trained
            network = copy.deepcopy(self.backbone).eval()
            params = [p.requires_grad_(True) for p in network.parameters() if p.is_floating_point()]

            def embed(x: Tensor) -> Tensor:
                return network(x).flatten(1).float()

            fitted = fit_linear(support_x.clone(), support_y.clone(), n_way, steps=self.hparams.head_steps,
                                lr=self.hparams.head_lr, embed=embed, parameters=params)
        return embed, lambda z: linear_logits(fitted, z)

    def _classify(self, classifier: Classifier, query_x: Tensor) -> Tensor:
        embed, classify = classifier
        with self.evaluating():
            return classify(embed(query_x))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskPredictor:
        batch, n_way = self._single_task(support_x, support_y)
        classifier = self.fit_head(batch.support_x[0], batch.support_y[0], n_way)
        return TaskPredictor(lambda query_x: self._classify(classifier, self.as_inputs(query_x, "query_x")), n_way)
