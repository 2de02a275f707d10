"""The width of a backbone's embedding, for learners that build layers on it (Pretrainer's classifier,
AttentionLearner's input projection): stated by the model, or measured by one forward of a training input."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_meta.models import embedding_width, infer_embedding_width


def embedding_width_from_data(learner: Any, backbone: nn.Module, argument: str) -> int:
    """D for ``backbone``: :func:`~lightning_meta.models.embedding_width`, else one forward (evaluation mode, no
    gradients) of the first training input of the trainer's :class:`~lightning_meta.EpisodicDataModule`. Raises a
    ``ValueError`` naming ``argument`` (the learner's way to state D) when neither is available."""
    width = embedding_width(backbone)
    if width is not None:
        return width
    trainer = getattr(learner, "_trainer", None)
    example = getattr(getattr(trainer, "datamodule", None), "example_input", None)
    if not callable(example):
        raise ValueError(
            f"{type(learner).__name__} cannot tell the width of {type(backbone).__name__}'s embedding (it states no "
            "`embedding_dim` or `num_features`) without an EpisodicDataModule to take an input from: pass "
            f"`{argument}=D` (the size of backbone(x).flatten(1))."
        )
    return infer_embedding_width(backbone, learner.as_inputs(example("train")))
