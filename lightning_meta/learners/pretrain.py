"""Supervised pretraining: the backbone as an all-classes classifier of the meta-training classes (Chen et al. 2019,
"A Closer Look at Few-shot Classification"; Tian et al. 2020, "Rethinking Few-Shot Image Classification: a Good
Embedding Is All You Need"; Chen et al. 2021, "Meta-Baseline")."""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta._checks import check_choice
from lightning_meta.data.checks import as_targets
from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.functional.heads import cosine_classifier_logits
from lightning_meta.learners.protonet import ProtoNet
from lightning_meta.learners.widths import embedding_width_from_data
from lightning_meta.models import embedding_width, infer_embedding_width

CLASSIFIERS = ("linear", "cosine")


class Pretrainer(ProtoNet):
    """Train the backbone with a linear classifier over all C training classes (cross-entropy on labelled batches),
    then use the backbone's embedding for few-shot tasks.

    Training consumes :class:`~lightning_meta.data.LabelledBatch` es (``EpisodicDataModule(...,
    pretrain_batch_size=128)``, or any loader of ``(x, y)`` batches with labels ``0..C-1``). Validation, testing and
    :meth:`adapt` are few-shot, by nearest prototype of the embeddings (a :class:`ProtoNet` evaluation; cosine by
    default, which suits a classifier's features; variable-way, variable-shot episodes as ragged meta-batches too), so
    a pretraining run reports the few-shot accuracy it reaches and is a learner of its own. Its ``backbone`` then
    initialises episodic training: ``ProtoNet(pretrainer.backbone)`` in one script, or
    ``Conv4(pretrained="pretrain.ckpt")`` in a second run's config.

    Args:
        backbone: maps ``[n, ...]`` inputs to embeddings ``[n, D]`` (e.g. ``Conv4()``).
        num_classes: C; ``None`` reads it from the data module (``pretrain_classes``) when ``fit`` starts.
        feature_dim: D; read from the backbone when not given (``embedding_dim`` of :mod:`lightning_meta.models`,
            timm's ``num_features``), else from one forward of a training input when ``fit`` starts (or of the first
            batch :meth:`classify` sees).
        classifier: ``"linear"`` (Baseline) or ``"cosine"``: Baseline++ (Chen et al. 2019), logits ``scale`` times
            the cosine between an embedding and each class's weight vector.
        distance: how few-shot evaluation compares a query to the prototypes (``"cosine"`` or ``"euclidean"``).
        scale: the temperature of cosine logits in evaluation (it scales the loss, not the accuracy).
        label_smoothing: of the cross-entropy.
        **kwargs: optimizer options of :class:`~lightning_meta.MetaLearner`.

    Example:
        >>> from lightning_meta.models import MLP
        >>> pre = Pretrainer(MLP(4, (16,)), num_classes=10)
        >>> pre.training_step(LabelledBatch(torch.randn(8, 4), torch.randint(0, 10, (8,))), 0).shape
        torch.Size([])
        >>> pre.adapt(torch.randn(3, 4), torch.arange(3))(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Optional[int] = None,
        feature_dim: Optional[int] = None,
        classifier: str = "linear",
        distance: str = "cosine",
        scale: float = 10.0,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("learn_scale", False):  # stored by ProtoNet's hyperparameters: only False comes back
            raise ValueError("Pretrainer does not learn the cosine scale (the classifier, not prototypes, is trained).")
        super().__init__(backbone, distance=distance, scale=scale, learn_scale=False, **kwargs)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be an integer >= 2 (or None), but got {num_classes!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Expected `label_smoothing` in [0, 1), but got {label_smoothing}.")
        check_choice("classifier", classifier, CLASSIFIERS)
        feature_dim = feature_dim or embedding_width(self.backbone)
        if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim < 1):
            raise ValueError(f"Expected `feature_dim` to be a positive integer (or None), but got {feature_dim!r}.")
        self.hparams.feature_dim = feature_dim
        self.classifier: Optional[nn.Module] = None
        if num_classes is not None and feature_dim is not None:
            self.classifier = self._new_classifier(feature_dim, num_classes)

    def _new_classifier(self, feature_dim: int, num_classes: int) -> nn.Module:
        self.hparams.feature_dim = feature_dim  # saved: the checkpoint loads without a forward
        if self.hparams.classifier == "cosine":
            return CosineClassifier(feature_dim, num_classes, self.hparams.scale)
        return nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.classifier is None else cast(int, self.classifier.out_features)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "pretrain_classes", None) if getattr(datamodule, "pretrain_batch_size", None) else None
        if classes is None and self.hparams.num_classes is None:
            raise ValueError(
                "Pretrainer(num_classes=None) reads the number of classes from an "
                "EpisodicDataModule(pretrain_batch_size=...); with another data module pass `num_classes`."
            )
        if classes is not None and self.hparams.num_classes not in (None, classes):
            raise ValueError(
                f"The training dataset has {classes} classes but Pretrainer(num_classes={self.hparams.num_classes})"
                f": pass num_classes={classes}, or None to read it from the data module."
            )
        if self.classifier is None:  # before the optimizer is built, so that it trains the classifier
            num_classes = classes or self.hparams.num_classes
            self.hparams.num_classes = num_classes  # saved with the checkpoint, so it loads without the data module
            width = self.hparams.feature_dim or embedding_width_from_data(self, self.backbone, "feature_dim")
            self.classifier = self._new_classifier(width, num_classes)

    def classify(self, x: Tensor) -> Tensor:
        """Logits ``[n, C]`` over the training classes."""
        if self.classifier is None and self.hparams.num_classes is not None:  # D unknown until now: one forward
            self.classifier = self._new_classifier(infer_embedding_width(self.backbone, x[0]), self.hparams.num_classes)
            self.classifier.to(x.device)
        if self.classifier is None:
            raise RuntimeError("The classifier is built when fit starts (num_classes=None): pass `num_classes` to use "
                               "it before training.")
        return self.compiled("classifier logits", self.class_logits)(x)

    def class_logits(self, x: Tensor) -> Tensor:
        """:meth:`classify` as a pure tensor function (compiled with ``compile=True``)."""
        z = self.embed(x)  # float32 (ProtoNet's distances): in the classifier's dtype (64-true, bf16-true)
        classifier = cast(nn.Module, self.classifier)  # built by classify or setup
        return classifier(z.to(cast(Tensor, classifier.weight).dtype))


    def prepare_batch(self, batch: Any) -> LabelledBatch:
        """A training batch as a :class:`LabelledBatch` in the weights' dtype, its labels checked against C."""
        if isinstance(batch, Episode) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"Pretrainer trains on labelled batches (x, y) of the training classes, but got "
                f"{type(batch).__name__}: build the data module with EpisodicDataModule(..., pretrain_batch_size=128)."
            )
        x, y = self.as_inputs(batch[0], "x"), as_targets(batch[1], "y").to(self.device)
        if y.is_floating_point() or y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"Expected `y` to be [n] integer class labels for x of shape {tuple(x.shape)}, but got "
                             f"{y.dtype} of shape {tuple(y.shape)}.")
        classes = self.num_classes
        if classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(f"Labels must be 0..{classes - 1} (num_classes={classes}), but this "
                             f"batch has labels from {int(y.min())} to {int(y.max())}.")
        return LabelledBatch(x, y)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        batch = self.prepare_batch(batch)
        logits = self.classify(batch.x)
        loss = nn.functional.cross_entropy(logits, batch.y, label_smoothing=self.hparams.label_smoothing)
        # checked and logged as one task whose queries are the batch (train/loss, train/acc)
        episode = Episode(batch.x[:0].unsqueeze(0), batch.y[:0].unsqueeze(0), batch.x.unsqueeze(0), batch.y[None])
        return self.finish_training_step(episode, logits.unsqueeze(0), loss)


class CosineClassifier(nn.Module):
    """Baseline++'s classifier (Chen et al. 2019): ``scale * cos(z, w_c)`` for each class weight vector ``w_c``.

    Example:
        >>> CosineClassifier(4, 3, scale=10.0)(torch.randn(2, 4)).abs().max() <= 10
        tensor(True)
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, z: Tensor) -> Tensor:
        return cosine_classifier_logits(z, self.weight, self.scale)
