"""Episode sampling: seeded, rank-aware, resumable.

Every episode is a pure function of ``(seed, stream, epoch, index)``: its random generator is derived from those four
numbers alone, so an episode does not depend on which process, worker or rank draws it, nor on what was drawn before.
Training meta-batches are cut from a global episode sequence: at step ``s`` with ``W`` ranks and ``B`` tasks per rank,
rank ``r`` draws the global episodes ``s*B*W + r*B ... s*B*W + (r+1)*B - 1``. The union over ranks at one step is
therefore exactly what one process with ``B*W`` tasks draws at that step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.data.streams import episode_rng
from lightning_meta.data.variable import Shot, VariableEpisodePlanner, VariableEpisodes


def labels_of(dataset) -> Tensor:
    """The integer class label of every item, read without loading any item.

    Looks for a ``labels`` attribute (our datasets, ``TensorClassDataset``), then ``targets`` (torchvision's
    ``ImageFolder``, ``MNIST``...), then ``_labels`` (some torchvision datasets).
    """
    for name in ("labels", "targets", "_labels", "y"):
        value = getattr(dataset, name, None)
        if value is not None:
            array = np.asarray(value.cpu() if isinstance(value, Tensor) else value)
            if array.dtype.kind in "USO":  # class names ("cat", "dog"): numbered in sorted order
                array = np.unique(array.astype(str), return_inverse=True)[1].reshape(array.shape)
            labels = torch.as_tensor(array)
            if labels.ndim != 1 or labels.is_floating_point():
                raise ValueError(
                    f"Expected `{type(dataset).__name__}.{name}` to be a 1-D sequence of integer class labels, "
                    f"but got shape {tuple(labels.shape)} and dtype {labels.dtype}."
                )
            if len(labels) != len(dataset):
                raise ValueError(
                    f"`{type(dataset).__name__}.{name}` has {len(labels)} entries but the dataset has "
                    f"{len(dataset)} items: they must match one to one."
                )
            return labels.long()
    raise TypeError(
        f"`{type(dataset).__name__}` does not expose its labels. Episodic sampling reads every item's class without "
        "loading images: give the dataset a `labels` attribute (a list or 1-D tensor of ints, one per item), or wrap "
        "your tensors in `lightning_meta.data.TensorClassDataset(x, y)`."
    )


def gather(dataset, indices: Tensor) -> Tensor:
    """Load the inputs at ``indices`` as one tensor ``[len(indices), ...]``.

    Datasets with a ``gather(indices)`` method (every in-memory dataset of this package) serve the whole set in one
    index operation; any other map-style dataset of ``(x, label)`` items is read item by item and stacked.
    """
    fast = getattr(dataset, "gather", None)
    if callable(fast):
        return fast(indices)
    items = [item_input(dataset, i) for i in indices.tolist()]
    shapes = {tuple(x.shape) for x in items}
    if len(shapes) > 1:
        raise ValueError(_shape_error(dataset, [(i, tuple(x.shape)) for i, x in zip(indices.tolist(), items)]))
    return torch.stack(items)


def item_input(dataset, index: int) -> Tensor:
    x = dataset[index][0]
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _shape_error(dataset, shapes: list[tuple[int, tuple]]) -> str:
    first_index, first = shapes[0]
    odd_index, odd = next((i, s) for i, s in shapes if s != first)
    return (f"Items of `{type(dataset).__name__}` differ in shape: item {first_index} is {first} but item {odd_index} is "
            f"{odd}. Episodes stack items into one tensor: resize them to one shape in the dataset (e.g. a "
            "torchvision Resize transform).")


def check_item_shapes(dataset, labels: Tensor, limit: int = 5000) -> None:
    """Raise before training when a dataset's items differ in shape: every item when there are at most ``limit``,
    else the first item of each class. In-memory datasets (with ``gather``) hold one tensor and are not read."""
    if callable(getattr(dataset, "gather", None)):
        return
    indices: Sequence[int]
    if len(labels) <= limit:
        indices = range(len(labels))
    else:
        indices = sorted(np.unique(labels.numpy(), return_index=True)[1].tolist())
    shapes = [(i, tuple(item_input(dataset, i).shape)) for i in indices]
    if len({s for _, s in shapes}) > 1:
        raise ValueError(_shape_error(dataset, shapes))


def class_table(labels: Tensor) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """A labelled dataset's classes: ``classes [C]`` (its labels in sorted order), ``counts [C]`` (items per class) and
    the index table ``[C, max count]`` whose row ``c`` lists the items of class ``c`` in dataset order, padded with -1.

    Example:
        >>> classes, counts, table = class_table(torch.tensor([7, 3, 7, 7]))
        >>> classes.tolist(), counts.tolist(), table.tolist()
        ([3, 7], [1, 3], [[1, -1, -1], [0, 2, 3]])
    """
    classes, counts = torch.unique(labels, return_counts=True)
    order = torch.argsort(labels, stable=True).numpy()
    sizes = counts.numpy()
    table = np.full((len(classes), int(sizes.max()) if len(sizes) else 0), -1, dtype=np.int64)
    row = np.repeat(np.arange(len(sizes)), sizes)  # [n] class row of each item in label order
    table[row, np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = order
    return classes, sizes, table


class ClassEpisodeSampler:
    """Draws N-way K-shot Q-query classification episodes from a labelled dataset.

    Within an episode the N classes are chosen without replacement and relabelled ``0..N-1`` in a random order; each
    class contributes K support and Q query items, all distinct, so support and query never share an item. Support and
    query are ordered class by class (``[class 0 x K, class 1 x K, ...]``).

    Example:
        >>> from lightning_meta.data import TensorClassDataset
        >>> ds = TensorClassDataset(torch.randn(60, 3), torch.arange(6).repeat_interleave(10))
        >>> sampler = ClassEpisodeSampler(ds, n_way=3, n_shot=2, n_query=4, seed=0)
        >>> ep = sampler.episode("train", epoch=0, index=7)
        >>> ep.support_x.shape, ep.support_y.tolist(), ep.query_y.shape
        (torch.Size([6, 3]), [0, 0, 1, 1, 2, 2], torch.Size([12]))
    """

    def __init__(self, dataset, n_way: int, n_shot: int, n_query: int, seed: int = 0, name: str = "dataset") -> None:
        self.dataset = dataset
        self.n_way, self.n_shot, self.n_query, self.seed = n_way, n_shot, n_query, seed
        labels = labels_of(dataset)
        check_item_shapes(dataset, labels)
        self.classes, self.counts, self.table = class_table(labels)
        classes = self.classes
        need = n_shot + n_query
        if len(classes) < n_way:
            raise ValueError(
                f"The {name} has {len(classes)} classes, fewer than `n_way`={n_way}: an episode needs {n_way} distinct "
                f"classes. Lower `n_way` or add classes."
            )
        small = [(classes[i].item(), int(c)) for i, c in enumerate(self.counts) if c < need]
        if small:
            names = getattr(dataset, "class_names", None)
            what = ", ".join(
                f"{names[label] if names is not None else label!r} ({count} items)" for label, count in small[:5]
            )
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise ValueError(
                f"The {name} has {len(small)} classes with fewer than n_shot + n_query = {n_shot} + {n_query} = {need} "
                f"items: {what}{more}. Every class must be able to fill an episode; lower `n_shot`/`n_query` or "
                f"remove those classes."
            )
        self._support_y = torch.arange(n_way).repeat_interleave(n_shot)
        self._query_y = torch.arange(n_way).repeat_interleave(n_query)

    def picks(self, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """Item indices ``[B, N, K+Q]`` of a meta-batch, one generator per episode, drawn for all episodes at once.

        Each episode draws uniform keys: the N classes with the smallest keys, in key order, are its classes
        ``0..N-1``; within a class, the items with the smallest keys are its K support and Q query items.
        """
        n_classes, width = self.table.shape
        n, need = self.n_way, self.n_shot + self.n_query
        keys = np.stack([rng.random(n_classes + n * width) for rng in rngs])  # [B, C + N*W]
        class_keys = keys[:, :n_classes]
        rows = np.argpartition(class_keys, n - 1, axis=1)[:, :n] if n < n_classes else np.tile(
            np.arange(n_classes), (len(rngs), 1))
        rows = np.take_along_axis(rows, np.argsort(np.take_along_axis(class_keys, rows, 1), axis=1), 1)  # [B, N]
        item_keys = keys[:, n_classes:].reshape(len(rngs), n, width)
        item_keys[np.arange(width) >= self.counts[rows][..., None]] = 2.0  # padding sorts last
        order = np.argsort(item_keys, axis=2)[..., :need]
        return np.take_along_axis(self.table[rows], order, axis=2)  # [B, N, K+Q]

    def episode(self, stream: str, epoch: int, index: int) -> Episode:
        return self.batch(stream, epoch, [index]).task(0)

    def batch(self, stream: str, epoch: int, indices: Sequence[int]) -> Episode:
        """The meta-batch of the episodes at ``indices``, with one gather for all of its items."""
        return self.draw([episode_rng(self.seed, stream, epoch, i) for i in indices])

    def draw(self, rngs: Sequence[np.random.Generator]) -> Episode:
        """The meta-batch of one episode per generator (what :meth:`batch` draws; several sources share them)."""
        picks = self.picks(rngs)
        b, k = len(rngs), self.n_shot
        flat = torch.from_numpy(np.concatenate([picks[..., :k].reshape(-1), picks[..., k:].reshape(-1)]))
        x = gather(self.dataset, flat)
        n_s = self.n_way * k
        support_x = x[: b * n_s].view(b, n_s, *x.shape[1:])
        query_x = x[b * n_s :].view(b, -1, *x.shape[1:])
        return Episode(support_x, self._support_y.expand(b, -1), query_x, self._query_y.expand(b, -1))


def class_hierarchy(dataset, num_classes: int, name: str) -> tuple[Optional[dict], Optional[Mapping]]:
    """The hierarchy a labelled dataset exposes, as :class:`~lightning_meta.data.VariableEpisodePlanner` takes it:
    ``(groups, dag)``, each ``None`` where absent. The protocol (one of the two attributes):

    - ``class_groups``: one group name per class, in the order of the dataset's sorted class labels (the order of its
      ``class_names``), e.g. Omniglot's alphabet of each character; returned as ``{group: [class index, ...]}`` in
      order of first appearance;
    - ``class_dag``: a mapping from each node to its children, whose leaves are the classes, named as in the dataset's
      ``class_names`` (class indices without names), e.g. ImageNet's WordNet graph.

    Example:
        >>> from lightning_meta.data import TensorClassDataset
        >>> ds = TensorClassDataset(torch.zeros(8, 1), torch.arange(4).repeat(2))
        >>> ds.class_groups = ["Greek", "Latin", "Greek", "Latin"]
        >>> class_hierarchy(ds, 4, "dataset")
        ({'Greek': [0, 2], 'Latin': [1, 3]}, None)
    """
    groups, dag = getattr(dataset, "class_groups", None), getattr(dataset, "class_dag", None)
    if groups is not None and dag is not None:
        raise ValueError(f"The {name} has both `class_groups` and `class_dag`: a source exposes one hierarchy (groups "
                         "of classes, or a class graph). Remove one of them.")
    if dag is not None:
        if not isinstance(dag, Mapping):
            raise TypeError(f"Expected `class_dag` of the {name} to be a mapping from each node to its children, but "
                            f"got {type(dag).__name__}.")
        return None, dag
    if groups is None:
        return None, None
    groups = list(groups)
    if len(groups) != num_classes:
        raise ValueError(f"`class_groups` of the {name} has {len(groups)} entries but the dataset has {num_classes} "
                         "classes: give one group name per class, in the order of its sorted class labels.")
    members: dict = {}
    for c, group in enumerate(groups):
        members.setdefault(group, []).append(c)
    return members, None


class VariableEpisodeSampler:
    """Meta-Dataset's variable-way, variable-shot episodes from a labelled dataset (Triantafillou et al., ICLR 2020),
    as :class:`~lightning_meta.data.RaggedEpisode` meta-batches.

    Each episode is a :class:`~lightning_meta.data.VariableEpisodePlanner` plan drawn from the episode's own generator
    (so a pure function of ``(seed, stream, epoch, index)``, like :class:`ClassEpisodeSampler`'s); a meta-batch reads
    all its items with one gather. Task ``i`` of a batch has ``ways[i]`` classes labelled ``0..ways[i]-1`` in the
    plan's (random) order, its support class by class (``shots[c]`` items each) and ``q`` queries per class.

    Args:
        dataset: a labelled map-style dataset (``labels``); a ``class_groups`` or ``class_dag`` attribute gives its
            hierarchy (:func:`class_hierarchy`).
        rules: the constants (:class:`~lightning_meta.data.VariableEpisodes`).
        n_way, n_shot, n_query: a number fixes that quantity (``n_shot`` may be a pair ``(lo, hi)``); ``None`` draws it
            by the rule.
        hierarchy: with variable ways, draw each episode's classes within one group or DAG node of the dataset's
            hierarchy where it has one; ``False`` (or a fixed ``n_way``) draws flat.

    Example:
        >>> from lightning_meta.data import TensorClassDataset, VariableEpisodes
        >>> ds = TensorClassDataset(torch.arange(200)[:, None], torch.arange(20).repeat_interleave(10))
        >>> sampler = VariableEpisodeSampler(ds, VariableEpisodes(min_way=3, max_way=6), n_query=2, seed=0)
        >>> batch = sampler.batch("train", epoch=0, indices=[0, 1])
        >>> batch.ways, batch.query_sizes, batch.support_x.shape[1:]
        ((3, 5), (6, 10), torch.Size([1]))
    """

    def __init__(self, dataset, rules: VariableEpisodes, n_way: Optional[int] = None, n_shot: Shot = None,
                 n_query: Optional[int] = None, seed: int = 0, name: str = "dataset", hierarchy: bool = True) -> None:
        self.dataset, self.seed = dataset, seed
        labels = labels_of(dataset)
        check_item_shapes(dataset, labels)
        self.classes, self.counts, self.table = class_table(labels)
        names = getattr(dataset, "class_names", None)
        names = list(names) if names is not None and len(names) == len(self.classes) else None
        groups, dag = class_hierarchy(dataset, len(self.classes), name) if hierarchy and n_way is None else (None, None)
        if groups is not None:
            small = [(g, len(m)) for g, m in groups.items() if len(m) < rules.min_way]
            if small:
                raise ValueError(
                    f"The {name}'s `class_groups` has {len(small)} group(s) with fewer classes than `min_way`="
                    f"{rules.min_way} (e.g. {small[0][0]!r} with {small[0][1]}): an episode draws its classes within "
                    "one group. Lower `VariableEpisodes(min_way=...)`, give the split whole groups (e.g. Omniglot's "
                    "`alphabets=`), or draw flat with `EpisodicDataModule(hierarchy=False)`.")
        self.planner = VariableEpisodePlanner(self.counts, rules, n_way=n_way, n_shot=n_shot, n_query=n_query,
                                              groups=groups, dag=dag, class_names=names, name=name)

    def batch(self, stream: str, epoch: int, indices: Sequence[int]) -> RaggedEpisode:
        """The meta-batch of the episodes at ``indices``, with one gather for all of its items."""
        return self.draw([episode_rng(self.seed, stream, epoch, i) for i in indices])

    def episode(self, stream: str, epoch: int, index: int) -> Episode:
        return self.batch(stream, epoch, [index]).task(0)

    def draw(self, rngs: Sequence[np.random.Generator]) -> RaggedEpisode:
        """The meta-batch of one episode per generator: supports of every task, then queries, in one gather."""
        plans = [self.planner.plan(rng) for rng in rngs]
        shots = [p.shots for p in plans]
        queries = [np.full(p.n_way, p.n_query) for p in plans]
        counts = np.concatenate(shots + queries)  # [sum N_i * 2] items per (task, class), supports then queries
        classes = np.concatenate([p.classes for p in plans] * 2)
        positions = np.concatenate([np.asarray(p.support) for p in plans] + [np.asarray(p.query) for p in plans])
        items = self.table[np.repeat(classes, counts), positions]  # [sum S_i + sum M_i] dataset indices
        x = gather(self.dataset, torch.from_numpy(items))
        labels = torch.from_numpy(np.repeat(np.concatenate([np.arange(p.n_way) for p in plans] * 2), counts))
        n_s = sum(int(k.sum()) for k in shots)
        return RaggedEpisode(x[:n_s], labels[:n_s], x[n_s:], labels[n_s:], tuple(int(k.sum()) for k in shots),
                             tuple(p.n_way * p.n_query for p in plans), tuple(p.n_way for p in plans))


class ClassBatchSampler:
    """Labelled batches for supervised pretraining: every epoch is one pass over the dataset in a shuffled order that
    is a pure function of ``(seed, epoch)``, cut into batches by position, so a batch does not depend on the process,
    worker or rank that draws it, and a run resumes exactly. Labels are renumbered ``0..C-1`` in sorted order of the
    dataset's own labels (``num_classes`` is C).

    Example:
        >>> from lightning_meta.data import TensorClassDataset
        >>> ds = TensorClassDataset(torch.randn(12, 3), torch.tensor([5, 9, 7]).repeat(4))
        >>> sampler = ClassBatchSampler(ds, seed=0)
        >>> batch = sampler.batch("train", epoch=0, indices=range(4))
        >>> sampler.num_classes, len(sampler), batch.x.shape, sorted(set(sampler.labels.tolist()))
        (3, 12, torch.Size([4, 3]), [0, 1, 2])
    """

    def __init__(self, dataset, seed: int = 0, name: str = "dataset") -> None:
        self.dataset, self.seed = dataset, seed
        labels = labels_of(dataset)
        check_item_shapes(dataset, labels)
        classes, self.labels = torch.unique(labels, return_inverse=True)
        self.num_classes = len(classes)
        if self.num_classes < 2:
            raise ValueError(f"Supervised pretraining needs at least 2 classes, but the {name} has {self.num_classes}.")
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def order(self, epoch: int) -> Tensor:
        """The item order of ``epoch``: a permutation drawn from ``(seed, epoch)`` alone."""
        if self._order is None or self._order[0] != epoch:
            rng = episode_rng(self.seed, "train", epoch, 2**63 - 1)  # an index no episode of the stream uses
            self._order = (epoch, torch.from_numpy(rng.permutation(len(self.labels))))
        return self._order[1]

    def batch(self, stream: str, epoch: int, indices: Sequence[int]) -> LabelledBatch:
        """The examples at ``indices`` of the epoch's order, with one gather."""
        items = self.order(epoch)[torch.as_tensor(list(indices), dtype=torch.long)]
        return LabelledBatch(gather(self.dataset, items), self.labels[items])


class TaskEpisodeSampler:
    """Draws episodes from a task distribution (e.g. :class:`~lightning_meta.data.Sinusoid`).

    The distribution's ``sample(rng, n_support, n_query)`` returns one task's ``(support_x, support_y, query_x,
    query_y)``; support holds ``n_way * n_shot`` points and query ``n_way * n_query`` (use ``n_way=1`` for the
    usual K-shot regression).
    """

    def __init__(self, tasks, n_way: int, n_shot: int, n_query: int, seed: int = 0) -> None:
        self.tasks, self.seed = tasks, seed
        self.n_support, self.n_query = n_way * n_shot, n_way * n_query

    def batch(self, stream: str, epoch: int, indices: Sequence[int]) -> Episode:
        parts = [self.tasks.sample(episode_rng(self.seed, stream, epoch, i), self.n_support, self.n_query) for i in indices]
        return Episode(*(torch.stack(field) for field in zip(*parts)))

    def episode(self, stream: str, epoch: int, index: int) -> Episode:
        return self.batch(stream, epoch, [index]).task(0)
