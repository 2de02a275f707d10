"""The backbone against the data, at setup: one forward of one input of each stream a Trainer entry point reads, so
that a backbone built for other inputs is named before any step (not deep in torch), and the width of its embedding,
for learners that build layers on it (Pretrainer's classifier, AttentionLearner's input projection)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_meta.models import backbone_spec, embedding_width, infer_embedding_width

STAGE_STREAMS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def probe_backbone(learner: Any, stage: str) -> None:
    """Run the learner's backbone once on the first input of each stream that ``stage`` reads from the trainer's
    :class:`~lightning_meta.EpisodicDataModule` (one forward per distinct input shape; two copies of the input
    ``[2, ...]``, so batch norm on batch statistics works): evaluation mode, no gradients, random streams untouched.
    A forward that fails raises a ``ValueError`` naming the input's shape, the backbone and the arguments to change.
    The widths of the embeddings ``{stream: D}`` are kept for :func:`embedding_width_from_data`. Does nothing without
    such a data module or without a ``backbone``."""
    trainer = getattr(learner, "_trainer", None)
    datamodule: Any = getattr(trainer, "datamodule", None)
    backbone = getattr(learner, "backbone", None)
    learner._data_widths = widths = {}
    if not isinstance(backbone, nn.Module) or not callable(getattr(datamodule, "example_input", None)):
        return
    done: dict[tuple, int] = {}
    for name in STAGE_STREAMS.get(stage, ()):
        for stream in datamodule.sets(name):
            example = datamodule.example_input(stream)  # one input [...], no batch dimension
            key = (tuple(example.shape), example.dtype)
            if key not in done:
                _check_range(learner, stream, example)
                done[key] = _forward_width(learner, backbone, stream, example)
            if done[key] >= 0:
                widths[stream] = done[key]


def _check_range(learner: Any, stream: str, example: Tensor) -> None:
    """Warn where the learner normalises float inputs that are not in [0, 1] (already normalised, or 0..255): the
    normalisation would be applied on top of theirs."""
    pair = getattr(learner, "input_normalization", None)
    if pair is None or not example.is_floating_point() or not example.numel():
        return
    low, high = float(example.min()), float(example.max())
    if low < 0 or high > 1:
        rank_zero_warn(f"{type(learner).__name__} normalises its inputs with mean {list(pair[0])} and std "
                       f"{list(pair[1])}, which expects images in [0, 1], but the first {stream} input spans [{low:.3g}, "
                       f"{high:.3g}] (already normalised?): pass `normalize=None` to use the inputs as they are, or "
                       "give images in [0, 1] (or uint8).")


def _forward_width(learner: Any, backbone: nn.Module, stream: str, example: Tensor) -> int:
    """The flat width of ``backbone``'s output for ``example`` (-1 when the output is not an ``[n, ...]`` tensor)."""
    x = learner.as_inputs(example[None].expand(2, *example.shape))
    modes = [(m, m.training) for m in backbone.modules()]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        backbone.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = backbone(x)
    except (RuntimeError, AssertionError) as err:  # torch's shape errors; timm's input-size checks assert
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise ValueError(_misfit_message(learner, backbone, stream, example, err)) from err
    finally:
        for module, training in modes:
            module.training = training
    return int(out.flatten(1).shape[1]) if isinstance(out, Tensor) and out.dim() >= 2 else -1


def _misfit_message(learner: Any, backbone: nn.Module, stream: str, example: Tensor, err: Exception) -> str:
    shape, name = tuple(example.shape), type(backbone).__name__
    spec = backbone_spec(backbone)
    args = spec["init_args"] if spec is not None else {}
    fixes: dict[str, Any] = {}
    first = next((m for m in backbone.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if isinstance(first, nn.modules.conv._ConvNd) and example.dim() >= 2 and first.in_channels != shape[0]:
        fixes["in_chans" if "in_chans" in args else "in_channels"] = shape[0]
    if isinstance(first, nn.Linear) and "in_features" in args and first.in_features != example.numel():
        fixes["in_features"] = example.numel()
    size_arg = next((k for k in ("image_size", "img_size") if k in args), None)  # ours; timm's
    if size_arg is not None and example.dim() == 3:
        side: Any = shape[1] if shape[1] == shape[2] else shape[1:]
        if args[size_arg] not in (side, list(shape[1:]), tuple(shape[1:])):
            fixes[size_arg] = side
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    maker = f"timm_backbone({args.get('model_name')!r}, " if spec and spec["class_path"] == "timm.create_model" else name + "("
    fix = (f"Build it for this data: {maker}{', '.join(f'{k}={v}' for k, v in fixes.items())})" if fixes else
           f"Build it for inputs of shape {shape} (its first layer's `in_channels` or `in_features`, and the input size "
           "any head is sized for)")
    gray = " or `mode='L'`" if fixes.get("in_channels", fixes.get("in_chans")) == 3 else ""
    return (f"{type(learner).__name__}'s backbone {name} does not fit the {stream} data: an input of shape {shape} "
            f"fails in its forward ({reason}). {fix}, or give the data the shape it expects (e.g. the dataset's "
            f"`image_size`{gray}).")


def embedding_width_from_data(learner: Any, backbone: nn.Module, argument: str) -> int:
    """D for ``backbone``: the width :func:`probe_backbone` measured on the first training input at setup, else
    :func:`~lightning_meta.models.embedding_width`, else one forward (evaluation mode, no gradients) of the first
    training input of the trainer's :class:`~lightning_meta.EpisodicDataModule`. Raises a ``ValueError`` naming
    ``argument`` (the learner's way to state D) when none is available."""
    width = getattr(learner, "_data_widths", {}).get("train") or embedding_width(backbone)
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
