"""RaggedEpisode: a meta-batch whose tasks differ in shape (variable ways, shots and queries per task).

Layout: **concatenated tasks with their sizes**. Task ``i`` owns ``support_sizes[i]`` consecutive rows of
``support_x``/``support_y`` and ``query_sizes[i]`` consecutive rows of ``query_x``/``query_y``; its labels are
``0..ways[i]-1``. A backbone therefore only ever sees real examples (no padding enters a network, so batch norm and
every other layer compute exactly what they compute on the tasks' own examples). Where a learner needs one tensor per
meta-batch after the backbone it pads (:meth:`RaggedEpisode.pad`) and masks, and the padded cells never reach a number.

What a learner returns for a ragged meta-batch: logits ``[B, M_max, N_max]`` (``M_max`` the most queries of a task,
``N_max`` the most ways); task ``i``'s logits are ``outputs[i, :query_sizes[i], :ways[i]]`` and every other cell is
``-inf`` (:meth:`RaggedEpisode.pad_outputs`; :meth:`RaggedEpisode.unpad_outputs` gives the per-task ``[M_i, N_i]``
back). Losses and accuracies are read from the task's own cells only (:meth:`RaggedEpisode.task_losses`,
:meth:`RaggedEpisode.task_accuracies`), which :class:`~lightning_meta.data.Episode` also offers for fixed shapes, so a
learner's meta-loss is written once: the mean over tasks of each task's mean query loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_meta.data.episode import Episode
from lightning_meta.functional.episode import full_precision


def _sizes(name: str, value: Any) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"Expected `{name}` to be a sequence of integers (one per task), but got {value!r}.") from None
    if any(s < 1 for s in sizes):
        raise ValueError(f"Expected every entry of `{name}` to be >= 1 (a task with no examples cannot be adapted on "
                         f"or judged), but got {list(sizes)}.")
    return sizes


@dataclass(eq=False)
class RaggedEpisode:
    """A meta-batch of classification tasks of different shapes, concatenated (see the module docstring).

    Fields: ``support_x [sum S_i, ...]``, ``support_y [sum S_i]``, ``query_x [sum M_i, ...]``, ``query_y [sum M_i]``
    (labels ``0..ways[i]-1`` within task ``i``), and per task ``support_sizes``, ``query_sizes`` and ``ways`` (tuples of
    ints). Like a batched :class:`~lightning_meta.data.Episode` it has ``num_tasks``, ``num_ways`` (the most ways of a
    task), ``task(i)`` (a one-task ``Episode``) and ``to(...)``.

    Example:
        >>> a = Episode(torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.zeros(2, 2), torch.tensor([1, 0]))
        >>> b = Episode(torch.ones(4, 2), torch.tensor([0, 1, 2, 0]), torch.ones(3, 2), torch.tensor([2, 1, 0]))
        >>> batch = RaggedEpisode.from_tasks([a, b])
        >>> batch.num_tasks, batch.ways, batch.support_sizes, batch.query_x.shape
        (2, (2, 3), (3, 4), torch.Size([5, 2]))
        >>> batch.task(1).support_y.tolist()
        [0, 1, 2, 0]
        >>> logits = batch.pad_outputs([torch.zeros(2, 2), torch.zeros(3, 3)])   # [B, M_max, N_max]
        >>> logits.shape, logits[0, :, 2].tolist()                                # task 0 has 2 ways
        (torch.Size([2, 3, 3]), [-inf, -inf, -inf])
        >>> batch.task_losses(logits)   # uniform logits: log(N_i) per task
        tensor([0.6931, 1.0986])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    support_sizes: tuple[int, ...]
    query_sizes: tuple[int, ...]
    ways: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("support_sizes", "query_sizes", "ways"):
            setattr(self, name, _sizes(name, getattr(self, name)))
        if not (len(self.support_sizes) == len(self.query_sizes) == len(self.ways)) or not self.ways:
            raise ValueError(f"A RaggedEpisode needs one support size, one query size and one number of ways per task, "
                             f"but got {len(self.support_sizes)}, {len(self.query_sizes)} and {len(self.ways)}.")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tasks(cls, tasks: Sequence[Episode]) -> RaggedEpisode:
        """Concatenate one-task episodes (no batch dimension; integer labels ``0..N_i-1``, every class in the support
        set); ``ways[i]`` is task ``i``'s largest support label + 1."""
        tasks = list(tasks)
        if not tasks:
            raise ValueError("RaggedEpisode.from_tasks needs at least one task.")
        for i, t in enumerate(tasks):
            if not isinstance(t, tuple) or len(t) != 4 or not all(isinstance(f, Tensor) for f in t):
                raise TypeError(f"Task {i} is a {type(t).__name__}: expected an Episode of four tensors without a batch "
                                "dimension.")
            if t.support_y.dim() != 1 or t.query_y.dim() != 1 or t.support_y.is_floating_point():
                raise ValueError(f"Task {i} has labels of shapes {tuple(t.support_y.shape)} and "
                                 f"{tuple(t.query_y.shape)} ({t.support_y.dtype}): a RaggedEpisode holds classification "
                                 "tasks without a batch dimension, support_y [S] and query_y [M] integer labels.")
        ways = tuple(int(t.support_y.max()) + 1 if len(t.support_y) else 0 for t in tasks)
        return cls(torch.cat([t.support_x for t in tasks]), torch.cat([t.support_y for t in tasks]),
                   torch.cat([t.query_x for t in tasks]), torch.cat([t.query_y for t in tasks]),
                   tuple(len(t.support_y) for t in tasks), tuple(len(t.query_y) for t in tasks), ways)

    # ------------------------------------------------------------------ what a batched Episode also has
    @property
    def num_tasks(self) -> int:
        return len(self.ways)

    @property
    def num_ways(self) -> int:
        """The most ways of a task in the meta-batch (``N_max``)."""
        return max(self.ways)

    @property
    def is_regression(self) -> bool:
        return False

    @property
    def max_support(self) -> int:
        return max(self.support_sizes)

    @property
    def max_query(self) -> int:
        return max(self.query_sizes)

    @property
    def support_offsets(self) -> tuple[int, ...]:
        """Where each task's support rows start (and, last, the total)."""
        return (0, *itertools.accumulate(self.support_sizes))

    @property
    def query_offsets(self) -> tuple[int, ...]:
        return (0, *itertools.accumulate(self.query_sizes))

    def task(self, index: int) -> Episode:
        """Task ``index`` as a one-task :class:`Episode` (no batch dimension): views, no copies."""
        if not -self.num_tasks <= index < self.num_tasks:
            raise IndexError(f"Task {index} of a meta-batch of {self.num_tasks} tasks.")
        index %= self.num_tasks
        s, q = self.support_offsets, self.query_offsets
        return Episode(self.support_x[s[index]:s[index + 1]], self.support_y[s[index]:s[index + 1]],
                       self.query_x[q[index]:q[index + 1]], self.query_y[q[index]:q[index + 1]])

    def tasks(self) -> Iterator[Episode]:
        return (self.task(i) for i in range(self.num_tasks))

    def to(self, *args, **kwargs) -> RaggedEpisode:
        """Move every tensor, like :meth:`torch.Tensor.to` (what Lightning calls to put a batch on the device)."""
        return self.replace(*(t.to(*args, **kwargs) for t in self.tensors))

    def pin_memory(self) -> RaggedEpisode:
        """For ``DataLoader(pin_memory=True)``."""
        return self.replace(*(t.pin_memory() for t in self.tensors))

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support_x, support_y, query_x, query_y)``."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def replace(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> RaggedEpisode:
        """The same tasks with other tensors (e.g. the inputs converted, or encoded by a network), sizes kept."""
        return RaggedEpisode(support_x, support_y, query_x, query_y, self.support_sizes, self.query_sizes, self.ways)

    # not iterable: a RaggedEpisode does not unpack into four [B, n, ...] tensors like a fixed Episode (read its
    # fields, or its tasks with task(i) / tasks()); Lightning then reads it as the dataclass it is
    __iter__ = None

    # ------------------------------------------------------------------ padding and groups
    def task_index(self, part: str = "query") -> Tensor:
        """``[sum M_i]`` (or ``[sum S_i]`` for ``part="support"``): which task each row belongs to, on the labels'
        device."""
        sizes, ref = (self.query_sizes, self.query_y) if part == "query" else (self.support_sizes, self.support_y)
        return torch.repeat_interleave(torch.arange(self.num_tasks, device=ref.device),
                                       torch.tensor(sizes, device=ref.device))

    def row_index(self, part: str = "query") -> Tensor:
        """``[sum M_i]``: each row's position within its task."""
        sizes, offsets = (self.query_sizes, self.query_offsets) if part == "query" else (self.support_sizes,
                                                                                        self.support_offsets)
        tasks = self.task_index(part)
        starts = torch.tensor(offsets[:-1], device=tasks.device)
        return torch.arange(len(tasks), device=tasks.device) - starts[tasks]

    def pad(self, rows: Tensor, part: str = "query", fill: float = 0.0) -> Tensor:
        """Concatenated rows ``[sum M_i, ...]`` of ``part`` (``"query"`` or ``"support"``) as ``[B, M_max, ...]``,
        the cells past a task's own rows set to ``fill``."""
        sizes = self.query_sizes if part == "query" else self.support_sizes
        out = rows.new_full((self.num_tasks, max(sizes), *rows.shape[1:]), fill)
        out[self.task_index(part), self.row_index(part)] = rows
        return out

    def mask(self, part: str = "query") -> Tensor:
        """``[B, M_max]`` booleans: True where a padded row is one of the task's own."""
        sizes = torch.tensor(self.query_sizes if part == "query" else self.support_sizes, device=self.query_y.device)
        return torch.arange(int(sizes.max()), device=sizes.device) < sizes[:, None]

    def way_mask(self) -> Tensor:
        """``[B, N_max]`` booleans: True for the classes each task has."""
        ways = torch.tensor(self.ways, device=self.query_y.device)
        return torch.arange(int(ways.max()), device=ways.device) < ways[:, None]

    def pad_outputs(self, per_task: Sequence[Tensor]) -> Tensor:
        """Per-task logits ``[..., M_i, N_i]`` (the same leading dimensions for every task, e.g. inner steps) as one
        ``[B, ..., M_max, N_max]`` tensor, ``-inf`` outside each task's own cells."""
        if len(per_task) != self.num_tasks:
            raise ValueError(f"Expected logits for each of the {self.num_tasks} tasks, but got {len(per_task)}.")
        first = per_task[0]
        out = first.new_full((self.num_tasks, *first.shape[:-2], self.max_query, self.num_ways), float("-inf"))
        for i, logits in enumerate(per_task):
            if logits.shape[-2:] != (self.query_sizes[i], self.ways[i]):
                raise ValueError(f"Task {i} has {self.query_sizes[i]} queries of {self.ways[i]} classes, but its logits "
                                 f"have shape {tuple(logits.shape)}: expected [..., {self.query_sizes[i]}, "
                                 f"{self.ways[i]}].")
            out[i, ..., : logits.shape[-2], : logits.shape[-1]] = logits
        return out

    def unpad_outputs(self, outputs: Tensor) -> list[Tensor]:
        """Each task's own logits ``[..., M_i, N_i]`` from ``[B, ..., M_max, N_max]``."""
        return [outputs[i, ..., : self.query_sizes[i], : self.ways[i]] for i in range(self.num_tasks)]

    def embed_tasks(self, embed: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """``embed`` (a backbone) run task by task on each task's own examples (support rows then queries, as a
        meta-batch of one runs them, so batch norm normalises each task with its own statistics and a task's
        embeddings never depend on the others), returned in this batch's layout: ``(support [sum S_i, ...],
        query [sum M_i, ...])``."""
        parts = [embed(torch.cat([t.support_x, t.query_x])) for t in self.tasks()]
        support = torch.cat([z[:s] for z, s in zip(parts, self.support_sizes)])
        query = torch.cat([z[s:] for z, s in zip(parts, self.support_sizes)])
        return support, query

    def shape_groups(self) -> list[list[int]]:
        """Tasks of identical shape (support size, query size and ways), in order of their first task: each group
        stacks into a fixed-shape meta-batch (:meth:`stack`), e.g. for one ``vmap`` over it."""
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, key in enumerate(zip(self.support_sizes, self.query_sizes, self.ways)):
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def stack(self, indices: Sequence[int]) -> Episode:
        """The tasks at ``indices`` (all of one shape, see :meth:`shape_groups`) as a batched :class:`Episode`."""
        shapes = {(self.support_sizes[i], self.query_sizes[i]) for i in indices}
        if len(shapes) != 1:
            raise ValueError(f"Tasks {list(indices)} differ in shape ({sorted(shapes)}): only tasks of one shape stack "
                             "into a batched Episode; group them with shape_groups().")
        tasks = [self.task(i) for i in indices]
        return Episode(*(torch.stack(f) for f in zip(*tasks)))

    # ------------------------------------------------------------------ per-task figures
    def _own_rows(self, outputs: Tensor) -> Tensor:
        """The queries' own rows ``[sum M_i, N_max]`` of padded logits ``[B, M_max, N_max]``."""
        expected = (self.num_tasks, self.max_query, self.num_ways)
        if tuple(outputs.shape) != expected:
            raise ValueError(f"Expected logits [B, M_max, N_max] = {list(expected)} for this ragged meta-batch, but got "
                             f"{list(outputs.shape)}: pad each task's [M_i, N_i] logits with pad_outputs().")
        return outputs[self.task_index(), self.row_index()]

    def _segment_mean(self, values: Tensor) -> Tensor:
        tasks = self.task_index()
        sums = values.new_zeros(self.num_tasks).index_add(0, tasks, values)
        return sums / torch.tensor(self.query_sizes, device=values.device, dtype=values.dtype)

    def task_losses(self, outputs: Tensor) -> Tensor:
        """``[B]``: each task's mean query cross-entropy over its own classes (computed in float32 or wider)."""
        rows = full_precision(self._own_rows(outputs))
        return self._segment_mean(F.cross_entropy(rows, self.query_y, reduction="none"))

    def task_accuracies(self, outputs: Tensor) -> Tensor:
        """``[B]``: each task's query accuracy."""
        rows = self._own_rows(outputs)
        return self._segment_mean((rows.argmax(-1) == self.query_y).float())

    def task_finite(self, outputs: Tensor) -> Tensor:
        """``[B]``: whether every logit of the task's own cells is finite (a diverged task has NaN)."""
        rows = self._own_rows(outputs.detach())
        own = torch.arange(rows.shape[1], device=rows.device) < torch.tensor(self.ways, device=rows.device)[
            self.task_index()][:, None]
        bad = (~torch.isfinite(rows.float()) & own).any(1).float()
        return self._segment_mean(bad) == 0

    def __repr__(self) -> str:
        return (f"RaggedEpisode({self.num_tasks} tasks, ways {list(self.ways)}, support sizes {list(self.support_sizes)}, "
                f"query sizes {list(self.query_sizes)}, inputs {tuple(self.support_x.shape[1:])})")


def is_ragged(batch: Any) -> bool:
    return isinstance(batch, RaggedEpisode)


__all__ = ["RaggedEpisode", "is_ragged"]
