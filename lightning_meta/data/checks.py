"""Episode validation: what a learner checks about a meta-batch (or one task's support set) before any work, with
errors that name the mismatch and the fix, and the conversions every learner applies to its inputs and labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_meta._checks import surely_finite
from lightning_meta.data.episode import Episode, LabelledBatch


def as_targets(y: Any, name: str = "labels") -> Tensor:
    """Labels as int64 whatever their integer width (int32 and uint8 labels are common in datasets); float targets
    (regression) as they are. Boolean labels are refused: say which classes they are with integers 0..N-1.

    Example:
        >>> as_targets(torch.tensor([0, 1], dtype=torch.int32)).dtype
        torch.int64
    """
    y = torch.as_tensor(y)
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"Expected `{name}` to be integer class labels 0..N-1 or float regression targets, but got "
                        f"{y.dtype}.")
    return y if y.is_floating_point() else y.long()


def as_inputs(x: Any, weight: Optional[Tensor], normalize: Optional[tuple[Tensor, Tensor]] = None,
              name: str = "inputs") -> Tensor:
    """Inputs on ``weight``'s device in its dtype: other float dtypes are cast, ``uint8`` images are moved first and
    converted there to floats in [0, 1] (``x / 255``, computed in float32); integer inputs keep their dtype. With
    ``normalize=(mean, std)`` (1-D, one value per channel or one for all), float inputs, taken to be in [0, 1], become
    ``(x - mean) / std`` over their channel dimension (``[..., C, H, W]``), computed in float32 or wider.

    Example:
        >>> as_inputs(torch.tensor([0, 255], dtype=torch.uint8), torch.zeros(1, dtype=torch.float64))
        tensor([0., 1.], dtype=torch.float64)
        >>> as_inputs(torch.full((1, 2, 1, 1), 255, dtype=torch.uint8), None,
        ...           (torch.tensor([0.5, 0.0]), torch.tensor([0.5, 2.0]))).flatten().tolist()
        [1.0, 0.5]
    """
    x = torch.as_tensor(x)
    device = weight.device if weight is not None else x.device
    if x.dtype == torch.uint8:
        x = x.to(device, non_blocking=True).to(torch.float32).div_(255)
    if normalize is not None and x.is_floating_point():
        mean, std = normalize
        channels = mean.numel()
        if channels > 1 and (x.dim() < 3 or x.shape[-3] != channels):
            raise ValueError(
                f"`normalize` has {channels} channel means and stds, but `{name}` has shape {tuple(x.shape)}: expected "
                f"images [..., {channels}, H, W]. Pass normalize=(mean, std) with one value per channel of these "
                "inputs (or one value for all), or normalize=None for inputs that need none.")
        shape = (channels, 1, 1) if channels > 1 else ()
        x = x.to(device, torch.promote_types(x.dtype, torch.float32), non_blocking=True)  # [..., C, H, W]
        x = (x - mean.to(device, x.dtype).view(shape)) / std.to(device, x.dtype).view(shape)
    if weight is None:
        return x
    return x.to(device=device, dtype=weight.dtype if x.is_floating_point() else x.dtype)


def check_meta_batch(batch: Any) -> tuple[Any, Any, Any, Any]:
    """A meta-batch's four parts; anything but a 4-tuple is refused with what to pass instead."""
    if not isinstance(batch, tuple) or len(batch) != 4:
        raise TypeError(
            f"Expected an Episode(support_x, support_y, query_x, query_y) meta-batch, but got "
            f"{type(batch).__name__}. For one task, use `learner.adapt(support_x, support_y)(query_x)`."
            + (" Labelled (x, y) batches (EpisodicDataModule(pretrain_batch_size=...)) train a Pretrainer."
               if isinstance(batch, LabelledBatch) else "")
        )
    sx, sy, qx, qy = batch
    return sx, sy, qx, qy


def check_episode(batch: Episode) -> int:
    """Shapes, dtypes and label ranges of a meta-batch; returns N (1 for regression). Errors name the mismatch.

    Example:
        >>> check_episode(Episode(torch.zeros(1, 2, 3), torch.tensor([[0, 1]]), torch.zeros(1, 1, 3), torch.tensor([[1]])))
        2
    """
    if not isinstance(batch, tuple) or len(batch) != 4:
        raise TypeError(f"Expected an Episode (support_x, support_y, query_x, query_y), but got {type(batch).__name__}.")
    sx, sy, qx, qy = batch
    for name, t in zip(Episode._fields, batch):
        if not isinstance(t, Tensor):
            raise TypeError(f"Episode.{name} must be a tensor, but got {type(t).__name__}.")
    vector = sy.is_floating_point() and sy.dim() == 3 and qy.dim() == 3  # [B, n, D] regression targets
    if not vector and (sy.dim() != 2 or qy.dim() != 2):
        raise ValueError(
            f"Expected support_y [B, N*K] and query_y [B, M] with a meta-batch dimension (or [B, N*K, D] and "
            f"[B, M, D] float targets for D-dimensional regression), but got shapes {tuple(sy.shape)} and "
            f"{tuple(qy.shape)}."
        )
    if vector and sy.shape[2] != qy.shape[2]:
        raise ValueError(f"Support and query targets differ in size: {sy.shape[2]} vs {qy.shape[2]} per example.")
    if sx.shape[:2] != sy.shape[:2] or qx.shape[:2] != qy.shape[:2]:
        raise ValueError(
            f"Episode inputs and labels disagree: support_x {tuple(sx.shape)} vs support_y {tuple(sy.shape)}, "
            f"query_x {tuple(qx.shape)} vs query_y {tuple(qy.shape)} (the first two dimensions must match)."
        )
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(f"Support and query inputs differ in shape: {tuple(sx.shape[2:])} vs {tuple(qx.shape[2:])}.")
    if sy.shape[1] == 0:
        raise ValueError("The episode's support set is empty: a task needs at least one labelled example to adapt on.")
    if qy.shape[1] == 0:
        raise ValueError("The episode's query set is empty: there is nothing to predict.")
    if sy.is_floating_point() != qy.is_floating_point():
        raise TypeError(f"support_y is {sy.dtype} but query_y is {qy.dtype}: both must be integer labels "
                        "(classification) or both float targets (regression).")
    _check_finite(batch)
    return 1 if sy.is_floating_point() else _check_labels(sy, qy)


def check_ragged(batch) -> int:
    """:func:`check_episode` for a :class:`~lightning_meta.data.RaggedEpisode`: sizes, dtypes, each task's labels
    ``0..N_i-1`` with every class in its support set, finite inputs; returns the most ways of a task."""
    for name, t in zip(("support_x", "support_y", "query_x", "query_y"), batch.tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"RaggedEpisode.{name} must be a tensor, but got {type(t).__name__}.")
    sx, sy, qx, qy = batch.tensors
    if sy.dim() != 1 or qy.dim() != 1 or sy.is_floating_point() or qy.is_floating_point():
        raise ValueError(f"A RaggedEpisode holds classification tasks: support_y [sum S_i] and query_y [sum M_i] "
                         f"integer labels, but got {tuple(sy.shape)} {sy.dtype} and {tuple(qy.shape)} {qy.dtype}.")
    for name, x, y, sizes in (("support", sx, sy, batch.support_sizes), ("query", qx, qy, batch.query_sizes)):
        if len(x) != len(y) or len(y) != sum(sizes):
            raise ValueError(f"RaggedEpisode {name} rows disagree: {name}_x has {len(x)} rows, {name}_y {len(y)}, and "
                             f"the {name}_sizes {list(sizes)} sum to {sum(sizes)}.")
    if sx.shape[1:] != qx.shape[1:]:
        raise ValueError(f"Support and query inputs differ in shape: {tuple(sx.shape[1:])} vs {tuple(qx.shape[1:])}.")
    _check_finite(Episode(sx, sy, qx, qy))
    ways = torch.tensor(batch.ways, device=sy.device)
    s_ways, q_ways = ways[batch.task_index("support")], ways[batch.task_index("query")]
    bad_s = (sy < 0) | (sy >= s_ways)
    bad_q = (qy < 0) | (qy >= q_ways)
    if bool(bad_s.any() | bad_q.any()):
        part, bad, tasks = ("support", bad_s, batch.task_index("support")) if bool(bad_s.any()) else (
            "query", bad_q, batch.task_index("query"))
        row = int(bad.nonzero()[0])
        task = int(tasks[row])
        label = int((sy if part == "support" else qy)[row])
        raise ValueError(f"Task {task} of the ragged meta-batch has {batch.ways[task]} ways, but a {part} label is "
                         f"{label}: each task's labels must be 0..{batch.ways[task] - 1}.")
    starts = torch.cumsum(ways, 0) - ways
    counts = torch.bincount(starts[batch.task_index("support")] + sy, minlength=int(ways.sum()))
    if bool((counts == 0).any()):
        missing = int((counts == 0).nonzero()[0])
        task = int(torch.searchsorted(starts, torch.tensor(missing, device=starts.device), right=True)) - 1
        raise ValueError(f"Task {task} of the ragged meta-batch has {batch.ways[task]} ways, but class "
                         f"{missing - int(starts[task])} has no support example: every class needs one.")
    return batch.num_ways


def task_as_episode(support_x: Any, support_y: Any, convert: Callable[[Any], Tensor] = torch.as_tensor) -> Episode:
    """One task's support set (no meta-batch dimension), converted (``convert``: the learner's ``as_inputs``;
    :func:`as_targets`), checked and returned as a meta-batch of one (its query part: the first support example).
    Errors speak of the task the user passed.

    Example:
        >>> task_as_episode(torch.zeros(2, 3), [1, 2])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `adapt` takes the support labels as 0..N-1 for N classes, but got the labels {1, 2} (2 classes): ...
    """
    if isinstance(support_y, (list, tuple)) and any(isinstance(v, str) for v in support_y):
        raise TypeError("`adapt` takes the support labels as integers 0..N-1 (or float targets), but got strings: "
                        "number the classes first, e.g. names = sorted(set(labels)); "
                        "support_y = torch.tensor([names.index(n) for n in labels]).")
    support_x, support_y = convert(support_x), as_targets(support_y, "support_y")
    if support_x.dim() == 0 or support_y.dim() == 0 or len(support_x) != len(support_y):
        raise ValueError(
            f"`adapt` takes one task: support_x [n, ...] with one label or target per example in support_y, but got "
            f"{len(support_x) if support_x.dim() else 'a scalar'} examples (shape {tuple(support_x.shape)}) and "
            f"{len(support_y) if support_y.dim() else 'a scalar'} labels (shape {tuple(support_y.shape)}).")
    if not support_y.is_floating_point() and support_y.dim() == 1 and len(support_y):
        classes = torch.unique(support_y)
        if classes[0] != 0 or classes[-1] != len(classes) - 1:
            shown = ", ".join(str(int(c)) for c in classes[:8]) + (", ..." if len(classes) > 8 else "")
            raise ValueError(
                f"`adapt` takes the support labels as 0..N-1 for N classes, but got the labels {{{shown}}} "
                f"({len(classes)} classes): number them 0..{len(classes) - 1} first, e.g. "
                "support_y = torch.unique(support_y, return_inverse=True)[1] (and map predictions back the same way).")
    if support_y.dim() != 1 and not (support_y.is_floating_point() and support_y.dim() == 2):
        raise ValueError(
            f"`adapt` takes one task without a batch dimension: support_y must be [N*K] labels or targets, or "
            f"[N*K, D] vector targets, but got shape {tuple(support_y.shape)}. For a meta-batch, call the learner "
            "on an Episode instead."
        )
    x, y = support_x.unsqueeze(0), support_y.to(support_x.device).unsqueeze(0)
    return Episode(x, y, x[:, :1], y[:, :1])


def _check_finite(batch: Episode) -> None:
    sx, sy, qx, qy = batch
    floats = [t for t in batch if t.is_floating_point()]
    if not surely_finite(floats):  # the exact checks run only when the quick one fails
        for name, t in (("support_x", sx), ("query_x", qx)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"Episode.{name} contains NaN or infinite values: clean the inputs before training.")
        if sy.is_floating_point() and not (torch.isfinite(sy).all() and torch.isfinite(qy).all()):
            raise ValueError("Episode regression targets contain NaN or infinite values.")


def _check_labels(sy: Tensor, qy: Tensor) -> int:
    """Class labels ``0..N-1`` with every class in every task's support set; returns N."""
    lo, hi = int(torch.minimum(sy.min(), qy.min())), int(sy.max())
    if lo < 0:
        raise ValueError(f"Episode labels must be 0..N-1, but found label {lo}.")
    n_way = hi + 1
    q_hi = int(qy.max())
    if q_hi >= n_way:
        raise ValueError(
            f"A query label ({q_hi}) is outside the support labels 0..{n_way - 1}: every query class must appear in "
            "the support set."
        )
    counts = torch.zeros(sy.shape[0], n_way, dtype=torch.long, device=sy.device).scatter_add_(1, sy, torch.ones_like(sy))
    if (counts == 0).any():
        missing = int((counts == 0).nonzero()[0, 1])
        raise ValueError(
            f"Support labels must cover 0..N-1 with N={n_way}, but class {missing} has no support example in some "
            "task: relabel each task's classes 0..N-1."
        )
    return n_way
