"""Several training sources (Meta-Dataset's training over many datasets): one source per episode, chosen uniformly
by the episode's own generator before anything else, so an episode never mixes classes of two sources and stays a pure
function of ``(seed, stream, epoch, index)``; and, for supervised pretraining, the sources as one labelled dataset with
their classes numbered one after another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.data.sampler import check_item_shapes, gather, item_input, labels_of
from lightning_meta.data.streams import episode_rng

Batch = Union[Episode, RaggedEpisode]


def _rows(n: int, like: Tensor) -> Tensor:
    """An empty ``[n, *like.shape[1:]]`` of ``like``'s dtype, in shared memory inside a DataLoader worker (the batch
    then reaches the main process without a copy, as :meth:`CachedImageDataset.gather` does)."""
    out = torch.empty((n, *like.shape[1:]), dtype=like.dtype)
    return out.share_memory_() if get_worker_info() is not None else out


class MultiSourceSampler:
    """Episodes from several sources: each episode draws its source uniformly from its own generator, then the
    source's sampler draws the episode from the same generator. A meta-batch gathers each source's items once.

    The sources' samplers are all fixed-shape (:class:`~lightning_meta.data.sampler.ClassEpisodeSampler`, batches are
    :class:`~lightning_meta.data.Episode` s) or all variable
    (:class:`~lightning_meta.data.sampler.VariableEpisodeSampler`, batches are
    :class:`~lightning_meta.data.RaggedEpisode` s), their inputs of one shape and dtype.

    Example:
        >>> from lightning_meta.data import TensorClassDataset
        >>> from lightning_meta.data.sampler import ClassEpisodeSampler
        >>> a = TensorClassDataset(torch.zeros(30, 2), torch.arange(6).repeat_interleave(5))
        >>> b = TensorClassDataset(torch.ones(40, 2), torch.arange(8).repeat_interleave(5))
        >>> sampler = MultiSourceSampler([ClassEpisodeSampler(d, 3, 1, 2) for d in (a, b)], ["a", "b"], seed=0)
        >>> sampler.sources("train", 0, range(6)).tolist()
        [0, 1, 1, 1, 0, 1]
        >>> sampler.batch("train", 0, range(6)).support_x[:, 0, 0].tolist()   # source b's inputs are ones
        [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    """

    def __init__(self, samplers: Sequence[Any], names: Sequence[str], seed: int = 0) -> None:
        if len(samplers) != len(names) or not samplers:
            raise ValueError(f"Expected one name per source sampler, but got {len(samplers)} samplers and {len(names)} "
                             "names.")
        self.samplers, self.names, self.seed = list(samplers), list(names), seed

    def _pick(self, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """``[B]`` each episode's source: the first draw of its generator."""
        return np.array([int(rng.integers(len(self.samplers))) for rng in rngs], dtype=np.int64)

    def sources(self, stream: str, epoch: int, indices: Sequence[int]) -> np.ndarray:
        """``[B]`` the source (its position in ``names``) of each episode at ``indices``."""
        return self._pick([episode_rng(self.seed, stream, epoch, i) for i in indices])

    def batch(self, stream: str, epoch: int, indices: Sequence[int]) -> Batch:
        return self.draw([episode_rng(self.seed, stream, epoch, i) for i in indices])

    def episode(self, stream: str, epoch: int, index: int) -> Episode:
        return self.batch(stream, epoch, [index]).task(0)

    def draw(self, rngs: Sequence[np.random.Generator]) -> Batch:
        """The meta-batch of one episode per generator, in their order: each source draws its episodes at once."""
        which = self._pick(rngs)
        parts = [(np.flatnonzero(which == s), s) for s in np.unique(which)]
        batches = [self.samplers[s].draw([rngs[int(i)] for i in where]) for where, s in parts]
        if len(batches) == 1:
            return batches[0]
        places = [where for where, _ in parts]
        if isinstance(batches[0], RaggedEpisode):
            return _merge_ragged(batches, places, len(rngs))
        return Episode(*(_place([b[f] for b in batches], places, len(rngs)) for f in range(4)))


def _place(parts: Sequence[Tensor], places: Sequence[np.ndarray], total: int) -> Tensor:
    """Rows ``parts[j]`` put at rows ``places[j]`` of one ``[total, ...]`` tensor."""
    out = _rows(total, parts[0])
    for rows, where in zip(parts, places):
        out[torch.from_numpy(where)] = rows
    return out


def _merge_ragged(batches: Sequence[RaggedEpisode], places: Sequence[np.ndarray], total: int) -> RaggedEpisode:
    """Ragged meta-batches of some of the tasks each (task ``j`` of ``batches[k]`` is task ``places[k][j]``) as one."""
    sizes = {}
    for part in ("support", "query", "ways"):
        per_task = np.zeros(total, dtype=np.int64)
        for b, where in zip(batches, places):
            per_task[where] = getattr(b, f"{part}_sizes" if part != "ways" else "ways")
        sizes[part] = per_task
    fields: list[Tensor] = []
    for part in ("support", "query"):
        starts = np.cumsum(sizes[part]) - sizes[part]  # [B] where each task's rows go
        rows = []
        for b, where in zip(batches, places):
            own = np.asarray(getattr(b, f"{part}_sizes"))
            local = np.cumsum(own) - own
            rows.append(np.repeat(starts[where] - local, own) + np.arange(int(own.sum())))
        n = int(sizes[part].sum())
        fields += [_place([getattr(b, f"{part}_x") for b in batches], rows, n),
                   _place([getattr(b, f"{part}_y") for b in batches], rows, n)]
    sx, sy, qx, qy = fields
    return RaggedEpisode(sx, sy, qx, qy, tuple(sizes["support"].tolist()), tuple(sizes["query"].tolist()),
                         tuple(sizes["ways"].tolist()))


class ConcatClasses(Dataset):
    """Labelled datasets as one, for supervised pretraining over several sources: items in order (source 0's, then
    source 1's, ...), classes numbered one source after another (source 0's classes ``0..C0-1`` in sorted order of its
    labels, source 1's ``C0..C0+C1-1``, ...). ``gather`` reads each source's items with one gather.

    Example:
        >>> from lightning_meta.data import TensorClassDataset
        >>> a = TensorClassDataset(torch.zeros(4, 2), torch.tensor([5, 9, 5, 9]))
        >>> b = TensorClassDataset(torch.ones(3, 2), torch.tensor([0, 1, 2]))
        >>> both = ConcatClasses([a, b])
        >>> both.labels.tolist(), both.num_classes, both.gather(torch.tensor([6, 0]))[:, 0].tolist()
        ([0, 1, 0, 1, 2, 3, 4], 5, [1.0, 0.0])
    """

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)
        labels, offset = [], 0
        for dataset in self.datasets:
            own = labels_of(dataset)
            check_item_shapes(dataset, own)
            inverse = torch.unique(own, return_inverse=True)[1]
            labels.append(inverse + offset)
            offset += int(inverse.max()) + 1 if len(inverse) else 0
        self.labels, self.num_classes = torch.cat(labels), offset
        lengths = torch.tensor([len(d) for d in self.datasets])
        self.ends = torch.cumsum(lengths, 0)
        self.starts = self.ends - lengths

    def __len__(self) -> int:
        return len(self.labels)

    def _locate(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Each index's source and its index within that source."""
        source = torch.searchsorted(self.ends, indices, right=True)
        return source, indices - self.starts[source]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        source, local = self._locate(torch.tensor([index]))
        return item_input(self.datasets[int(source)], int(local)), int(self.labels[index])

    def gather(self, indices: Tensor) -> Tensor:
        source, local = self._locate(indices)
        present = torch.unique(source).tolist()
        if len(present) == 1:
            return gather(self.datasets[present[0]], local)
        parts = [(source == s).nonzero().squeeze(1) for s in present]
        return _place([gather(self.datasets[s], local[where]) for s, where in zip(present, parts)],
                      [where.numpy() for where in parts], len(indices))


def input_spec(dataset) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of a labelled dataset's inputs as episodes gather them (its first item)."""
    x = gather(dataset, torch.zeros(1, dtype=torch.long))
    return tuple(x.shape[1:]), x.dtype


def check_same_inputs(sources: dict[str, Any], what: str) -> None:
    """Raise when the named sources' inputs differ in shape or dtype: their episodes share meta-batches."""
    specs = {name: input_spec(source) for name, source in sources.items()}
    first = next(iter(specs))
    for name, spec in specs.items():
        if spec != specs[first]:
            described = {n: f"{list(specs[n][0])} {str(specs[n][1]).replace('torch.', '')}" for n in (first, name)}
            raise ValueError(
                f"The {what} sources {first!r} ({type(sources[first]).__name__}) and {name!r} "
                f"({type(sources[name]).__name__}) give inputs of different shapes or dtypes: {described[first]} and "
                f"{described[name]}. Their episodes share meta-batches, so every source must give one input shape and "
                "dtype: resize them to one size (e.g. the datasets' `image_size`) and one format (e.g. all uint8 "
                "images).")


__all__ = ["ConcatClasses", "MultiSourceSampler", "check_same_inputs"]
