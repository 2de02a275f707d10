"""learn2learn interop: its task datasets as episode sources, so learn2learn data pipelines feed our learners."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from lightning_meta.data.episode import Episode
from lightning_meta.data.streams import STREAMS

INSTALL = (
    "learn2learn is not installed. It does not build on Python 3.11+ with pip's build isolation; install it with:\n"
    "  pip install cython setuptools\n"
    "  pip install --no-deps --no-build-isolation -C--global-option=build_ext learn2learn==0.2.0\n"
    "  pip install gym scipy qpth torchvision"
)


def is_learn2learn_taskset(source) -> bool:
    return type(source).__name__ == "TaskDataset" and type(source).__module__.startswith("learn2learn")


def learn2learn_tasksets(name: str, **kwargs):
    """``learn2learn.vision.benchmarks.get_tasksets(name, **kwargs)``: pass its ``.train``, ``.validation`` and
    ``.test`` to :class:`EpisodicDataModule`. Raises an ImportError with the install recipe when learn2learn is absent."""
    try:
        from learn2learn.vision.benchmarks import get_tasksets
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return get_tasksets(name, **kwargs)


class Learn2LearnTaskSampler:
    """Episodes from a learn2learn ``TaskDataset`` (e.g. ``NWays``/``KShots``/``LoadData``/``RemapLabels``).

    Each task's items are split class by class into ``n_shot`` support and ``n_query`` query items, classes relabelled
    ``0..N-1``; the task dataset must give ``n_way`` classes of ``n_shot + n_query`` items. learn2learn draws tasks with
    Python's ``random``: each episode seeds it from (seed, stream, epoch, index) and restores the caller's state after,
    so episodes are as reproducible as ours (randomness inside the dataset's own transforms is not covered).
    """

    def __init__(self, taskset, n_way: int, n_shot: int, n_query: int, seed: int = 0, name: str = "dataset") -> None:
        self.taskset, self.n_way, self.n_shot, self.n_query, self.seed, self.name = taskset, n_way, n_shot, n_query, seed, name

    def _task(self, stream: str, epoch: int, index: int) -> Episode:
        state = random.getstate()
        random.seed(int(np.random.SeedSequence([self.seed, STREAMS[stream], epoch, index]).generate_state(1)[0]))
        try:
            x, y = self.taskset.sample()
        finally:
            random.setstate(state)
        y = torch.as_tensor(y).long()
        classes, counts = torch.unique(y, return_counts=True)
        need = self.n_shot + self.n_query
        if len(classes) != self.n_way or (counts != need).any():
            raise ValueError(
                f"The learn2learn task dataset for {self.name} gave a task of {len(classes)} classes with "
                f"{counts.tolist()} items each, but the data module asks for n_way={self.n_way} classes of "
                f"n_shot + n_query = {need} items: build it with NWays({self.n_way}) and KShots({need})."
            )
        order = torch.argsort(y, stable=True).view(self.n_way, need)  # [N, K+Q], one class per row
        support, query = order[:, : self.n_shot].reshape(-1), order[:, self.n_shot :].reshape(-1)
        return Episode(x[support], torch.arange(self.n_way).repeat_interleave(self.n_shot), x[query],
                       torch.arange(self.n_way).repeat_interleave(self.n_query))

    def batch(self, stream: str, epoch: int, indices: Sequence[int]) -> Episode:
        tasks = [self._task(stream, epoch, i) for i in indices]
        return Episode(*(torch.stack(field) for field in zip(*tasks)))

    def episode(self, stream: str, epoch: int, index: int) -> Episode:
        return self._task(stream, epoch, index)
