"""Which kind of episode source a dataset is, and the sampler for it: decided in one place."""

from __future__ import annotations

from typing import Optional

from lightning_meta.data.datasets.huggingface import HuggingFaceImages, is_huggingface_dataset
from lightning_meta.data.interop import Learn2LearnTaskSampler, is_learn2learn_taskset
from lightning_meta.data.sampler import ClassEpisodeSampler, TaskEpisodeSampler, VariableEpisodeSampler
from lightning_meta.data.variable import VariableEpisodes

KINDS = ("learn2learn", "tasks", "classes")


def as_sources(value):
    """:func:`as_source` of a source, or of each set of a dict of named sets."""
    if isinstance(value, dict) and not _is_dataset_dict(value):
        return {name: as_source(source) for name, source in value.items()}
    return as_source(value)


def _is_dataset_dict(value) -> bool:
    return type(value).__name__ == "DatasetDict" and type(value).__module__.startswith("datasets.")


def as_source(source):
    """A source as the samplers read it: a Hugging Face ``datasets.Dataset`` becomes :class:`HuggingFaceImages` (columns
    ``image`` and ``label``); anything else is returned as it is."""
    if is_huggingface_dataset(source):
        return HuggingFaceImages(source)
    if _is_dataset_dict(source):
        raise TypeError(f"Got a Hugging Face DatasetDict with the splits {list(source)}: pass one split as each source, "
                        "e.g. train=ds['train'], test=ds['test'].")
    return source


def source_kind(source) -> str:
    """``"learn2learn"`` (a learn2learn ``TaskDataset``), ``"tasks"`` (a task distribution with
    ``sample(rng, n_support, n_query)``) or ``"classes"`` (a labelled map-style dataset)."""
    if is_learn2learn_taskset(source):
        return "learn2learn"
    if callable(getattr(source, "sample", None)) and not hasattr(source, "__getitem__"):
        return "tasks"
    return "classes"


def fixed_shot(n_shot) -> Optional[int]:
    """``n_shot`` as one number where it is fixed (an int, or a pair ``(k, k)``), else ``None``."""
    if isinstance(n_shot, (tuple, list)) and len(n_shot) == 2 and n_shot[0] == n_shot[1]:
        return n_shot[0]
    return n_shot if isinstance(n_shot, int) else None


def is_variable(n_way, n_shot, n_query) -> bool:
    """Whether episodes of these settings can differ in shape: ``None`` draws a quantity by Meta-Dataset's rule and a
    pair ``(lo, hi)`` draws the shots per episode."""
    return n_way is None or n_query is None or fixed_shot(n_shot) is None


def make_sampler(source, n_way, n_shot, n_query, seed: int, name: str,
                 rules: Optional[VariableEpisodes] = None, hierarchy: bool = True):
    """The sampler for a labelled dataset, a task distribution or a learn2learn task dataset; variable episodes
    (:func:`is_variable`, with ``rules``) from a labelled dataset."""
    kind = source_kind(source)
    if is_variable(n_way, n_shot, n_query):
        if kind != "classes" or rules is None:  # the data module names these before it builds a sampler
            raise ValueError(f"Variable episodes need `rules` and a labelled dataset, but the {name} is a {kind} source.")
        return VariableEpisodeSampler(source, rules, n_way, n_shot, n_query, seed, name, hierarchy)
    n_shot = fixed_shot(n_shot)
    if kind == "learn2learn":
        return Learn2LearnTaskSampler(source, n_way, n_shot, n_query, seed, name)
    if kind == "tasks":
        return TaskEpisodeSampler(source, n_way, n_shot, n_query, seed)
    return ClassEpisodeSampler(source, n_way, n_shot, n_query, seed, name)
