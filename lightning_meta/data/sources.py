"""Which kind of episode source a dataset is, and the sampler for it: decided in one place."""

from __future__ import annotations

from lightning_meta.data.interop import Learn2LearnTaskSampler, is_learn2learn_taskset
from lightning_meta.data.sampler import ClassEpisodeSampler, TaskEpisodeSampler

KINDS = ("learn2learn", "tasks", "classes")


def source_kind(source) -> str:
    """``"learn2learn"`` (a learn2learn ``TaskDataset``), ``"tasks"`` (a task distribution with
    ``sample(rng, n_support, n_query)``) or ``"classes"`` (a labelled map-style dataset)."""
    if is_learn2learn_taskset(source):
        return "learn2learn"
    if callable(getattr(source, "sample", None)) and not hasattr(source, "__getitem__"):
        return "tasks"
    return "classes"


def make_sampler(source, n_way: int, n_shot: int, n_query: int, seed: int, name: str):
    """The sampler for a labelled dataset, a task distribution or a learn2learn task dataset."""
    kind = source_kind(source)
    if kind == "learn2learn":
        return Learn2LearnTaskSampler(source, n_way, n_shot, n_query, seed, name)
    if kind == "tasks":
        return TaskEpisodeSampler(source, n_way, n_shot, n_query, seed)
    return ClassEpisodeSampler(source, n_way, n_shot, n_query, seed, name)
