"""EpisodicDataModule: episodes for training, validation and testing, seeded, rank-aware and resumable."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from typing_extensions import override

from lightning_meta import trainer_view
from lightning_meta._checks import check_int
from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.data.multisource import ConcatClasses, MultiSourceSampler, check_same_inputs
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.data.sampler import ClassBatchSampler
from lightning_meta.data.sources import as_source, as_sources, fixed_shot, is_variable, make_sampler, source_kind
from lightning_meta.data.tasks import TaskDistribution
from lightning_meta.data.variable import Shot, VariableEpisodes

Source = Union[Dataset, TaskDistribution]
EvalSources = Union[Source, dict[str, Source]]
TrainSources = Union[Source, list[Source], dict[str, Source]]


class _EpisodeStream(IterableDataset):
    """Meta-batches of one stream for one rank; each worker serves every ``num_workers``-th step."""

    def __init__(self, sampler, stream: str, episodes: int, meta_batch: int, world: int, rank: int,
                 transform: Optional[Callable] = None, seed: int = 0) -> None:
        self.sampler, self.stream, self.episodes, self.meta_batch = sampler, stream, episodes, meta_batch
        self.world, self.rank = world, rank
        self.transform, self.seed = transform, seed
        self.epoch, self.start = 0, 0

    def step_indices(self, step: int) -> list[int]:
        """Global episode indices of this rank's meta-batch at ``step``."""
        if self.stream == "train":
            first = (step * self.world + self.rank) * self.meta_batch
            return list(range(first, first + self.meta_batch))
        # evaluation: episodes 0..E-1, meta-batch s goes to rank s % world; the last one may be short
        first = (step * self.world + self.rank) * self.meta_batch
        return list(range(first, min(first + self.meta_batch, self.episodes)))

    def __len__(self) -> int:
        if self.stream == "train":
            return self.episodes // (self.meta_batch * self.world)
        total = math.ceil(self.episodes / self.meta_batch)
        return len(range(self.rank, total, self.world))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch if self.stream == "train" else 0
        for step in range(self.start + worker, len(self), workers):
            indices = self.step_indices(step)
            batch = self.sampler.batch(self.stream, epoch, indices)
            if self.transform is not None:  # its randomness: a pure function of (seed, epoch, first episode)
                state = np.random.SeedSequence([self.seed, epoch, indices[0], 0x5A17]).generate_state(2)
                g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
                if isinstance(batch, LabelledBatch):  # pretraining: the batch's images as one task's
                    yield LabelledBatch(self.transform(batch.x.unsqueeze(0), g).squeeze(0), batch.y)
                    continue
                if isinstance(batch, RaggedEpisode):  # concatenated tasks: all supports, then all queries, as one
                    yield batch.replace(self.transform(batch.support_x[None], g)[0], batch.support_y,
                                        self.transform(batch.query_x[None], g)[0], batch.query_y)
                    continue
                batch = Episode(self.transform(batch.support_x, g), batch.support_y,
                                self.transform(batch.query_x, g), batch.query_y)
            yield batch


class _EpisodeLoader(DataLoader):
    """A DataLoader over an episode stream. The training loader belongs to its data module: each time it is iterated it
    asks the module for the epoch and resume position, and its ``state_dict`` is the module's, so Lightning sees a
    resumable loader (one source of truth for the position: the data module)."""

    def __init__(self, stream: _EpisodeStream, num_workers: int, pin_memory: bool, owner: EpisodicDataModule) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self._owner, self._stream = owner, stream

    def __iter__(self):
        self._owner._before_train_iter(self._stream)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self._owner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._owner.load_state_dict(state_dict)


class EpisodicDataModule(L.LightningDataModule):
    """Episodes for meta-training, validation and testing from labelled datasets or task distributions.

    Args:
        train, val, test: map-style datasets of ``(x, label)`` that expose their labels (a ``labels`` attribute), or
            task distributions such as :class:`~lightning_meta.data.Sinusoid`, or Hugging Face ``datasets.Dataset`` s
            with ``image`` and ``label`` columns (see :class:`~lightning_meta.data.HuggingFaceImages` for other
            columns). ``val``/``test`` may be ``None``, or
            a dict of named sets (``test={"cub": cub, "omniglot": omni}``): each is its own evaluation stream in one
            ``trainer.validate``/``trainer.test``, logged as ``test/cub/acc``, ``test/cub/acc_ci95``, ... in its
            own loader's results, beside ``test/acc``, ``test/loss``, ``test/acc_ci95``: the mean over the sets and
            its interval (:mod:`~lightning_meta.learners.episode_log`), which ``monitor="val/acc"`` reads; every set
            draws its episodes as it would alone. ``train`` may also be several labelled datasets, a list
            (``train=[omniglot, glyphs]``) or a dict (``train={"omniglot": omniglot, "glyphs": glyphs}``): each episode
            draws one source uniformly (the first draw of its own generator), then all its classes from that source,
            so an episode never mixes sources. Their inputs must have one shape and dtype. Pretraining reads them all,
            their classes numbered one source after another (source 0's ``0..C0-1``, source 1's ``C0..C0+C1-1``...).
        n_way, n_shot, n_query: evaluation episodes are N-way K-shot with Q queries per class. With
            ``variable_episodes``, ``None`` draws that quantity per episode by Meta-Dataset's rule (and ``n_shot``
            may be a pair ``(lo, hi)``: every class of an episode gets one number of shots drawn uniformly from it),
            while a number fixes it, as the reference's ``num_ways``/``num_support``/``num_query`` do.
        meta_batch_size: tasks per optimizer step on each rank (the global meta-batch is this times world size).
        train_episodes: training episodes per epoch, over all ranks together.
        val_episodes, test_episodes: the fixed evaluation episodes.
        train_way, train_shot, train_query: training overrides (default to the evaluation values), e.g. 60-way
            training for 5-way tests as in the Prototypical Networks paper; ``"variable"`` draws that quantity by the
            rules of ``variable_episodes`` in training only (Meta-Dataset-style training, fixed 5-way 1-shot tests).
        seed: fixes every episode. Training episodes are a pure function of (seed, epoch, position); validation and
            test episodes are the same on every run, epoch, rank count and worker count.
        num_workers: DataLoader workers (episodes do not depend on it).
        eval_meta_batch_size: tasks per evaluation batch (defaults to ``meta_batch_size``).
        train_transform: augmentation of training inputs, ``(x [B, n, ...], generator) -> x`` (e.g.
            :class:`~lightning_meta.data.RandomShift`), drawn from a generator that is a pure function of (seed, epoch,
            position), so augmented runs are reproducible and resume exactly. Evaluation episodes are never augmented.
        variable_episodes: Meta-Dataset's variable-way, variable-shot episodes (Triantafillou et al., ICLR 2020):
            the rules' constants (:class:`~lightning_meta.data.VariableEpisodes`, or a dict of its fields) for the
            quantities given as ``None`` (or a shot range). Training, validation and test streams all follow them
            (``train_way``/``train_shot``/``train_query`` numbers still fix training's); episodes stay a pure function
            of (seed, stream, epoch, position). A stream whose episodes can differ in shape yields
            :class:`~lightning_meta.data.RaggedEpisode` meta-batches (tasks concatenated, with their sizes); one whose
            quantities are all numbers yields :class:`~lightning_meta.data.Episode` s as without it. Needs labelled
            datasets (classification).
        hierarchy: with variable ways, a source that groups its classes draws each episode's classes within one
            group (Meta-Dataset's one alphabet per Omniglot episode) or one node of its class graph (ImageNet's
            WordNet). The protocol: a ``class_groups`` attribute, one group name per class in the order of the
            dataset's sorted class labels (:class:`~lightning_meta.data.Omniglot` gives its alphabets), or a
            ``class_dag`` mapping each node to its children, whose leaves are the dataset's ``class_names``
            (:func:`~lightning_meta.data.sampler.class_hierarchy`). ``False`` draws flat; a fixed ``n_way`` always
            draws flat.
        pretrain_batch_size: for supervised pretraining (:class:`~lightning_meta.Pretrainer`): training yields
            :class:`~lightning_meta.data.LabelledBatch` es of this many examples of the training dataset with its
            classes numbered ``0..C-1`` (``pretrain_classes`` is C), each epoch one shuffled pass over the dataset
            (``train_episodes``, ``train_way``/``shot``/``query`` and ``meta_batch_size`` do not apply to training
            then). Validation and test stay episodes, ``train_transform`` still applies, and batches are as
            reproducible, rank-distinct and resumable as episodes.

    Under DDP each rank draws distinct episodes: at step ``s`` rank ``r`` takes global episodes
    ``(s*W + r)*B ... (s*W + r + 1)*B - 1``, so the union over ranks is what one process with ``B*W`` draws.

    Example:
        >>> import torch
        >>> from lightning_meta.data import TensorClassDataset
        >>> ds = TensorClassDataset(torch.randn(100, 8), torch.arange(10).repeat_interleave(10))
        >>> dm = EpisodicDataModule(train=ds, n_way=5, n_shot=1, n_query=3, meta_batch_size=4, train_episodes=40)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([4, 5, 8]), torch.Size([4, 15]))

    Variable episodes (here from 3 to 6 ways, the shots and queries by the rule) arrive as ragged meta-batches:
        >>> from lightning_meta.data import VariableEpisodes
        >>> dm = EpisodicDataModule(train=ds, n_way=None, n_shot=None, n_query=None, meta_batch_size=2,
        ...                         train_episodes=40, variable_episodes=VariableEpisodes(min_way=3, max_way=6))
        >>> batch = next(iter(dm.train_dataloader()))
        >>> type(batch).__name__, batch.ways, batch.query_sizes, batch.support_x.shape[1:]
        ('RaggedEpisode', (3, 5), (15, 25), torch.Size([8]))
    """

    def __init__(
        self,
        train: Optional[TrainSources] = None,
        val: Optional[EvalSources] = None,
        test: Optional[EvalSources] = None,
        n_way: Optional[int] = 5,
        n_shot: Shot = 1,
        n_query: Optional[int] = 15,
        meta_batch_size: int = 1,
        train_episodes: int = 1000,
        val_episodes: int = 100,
        test_episodes: int = 600,
        train_way: Union[int, str, None] = None,
        train_shot: Union[Shot, str] = None,
        train_query: Union[int, str, None] = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        eval_meta_batch_size: Optional[int] = None,
        train_transform: Optional[Callable] = None,
        pretrain_batch_size: Optional[int] = None,
        variable_episodes: Union[VariableEpisodes, dict[str, Any], None] = None,
        hierarchy: bool = True,
    ) -> None:
        super().__init__()
        if train_transform is not None and not callable(train_transform):
            raise TypeError(f"`train_transform` must be a callable (x, generator) -> x such as RandomShift(3), but got "
                            f"{type(train_transform).__name__}.")
        self.train_transform = train_transform
        for name, minimum in (
            ("meta_batch_size", 1), ("train_episodes", 1), ("val_episodes", 1), ("test_episodes", 1), ("seed", 0),
            ("num_workers", 0),
        ):  # fmt: skip
            check_int(name, locals()[name], minimum)
        for name in ("eval_meta_batch_size", "pretrain_batch_size"):
            if locals()[name] is not None:
                check_int(name, locals()[name], 1)
        self.variable_episodes = rules = _rules(variable_episodes)
        if not isinstance(hierarchy, bool):
            raise TypeError(f"Expected `hierarchy` to be True or False, but got {hierarchy!r}.")
        given = {"train_way": train_way, "train_shot": train_shot, "train_query": train_query}
        for name, choice in given.items():
            if isinstance(choice, str) and choice != VARIABLE:
                raise ValueError(f"Expected `{name}` to be a number, None (as the evaluation episodes) or "
                                 f"\"{VARIABLE}\" (drawn by the rule in training only), but got {choice!r}.")
        quantities: dict[str, Any] = {"n_way": n_way, "n_shot": n_shot, "n_query": n_query, **given}
        for name, quantity in quantities.items():
            if not name.startswith("train_") or quantity is not None:
                _check_quantity(name, None if quantity == VARIABLE else quantity, rules)
        if train is None and val is None and test is None:
            raise ValueError("EpisodicDataModule needs at least one of `train`, `val` or `test`; all three are None.")
        train, val, test = _as_train(train), as_sources(val), as_sources(test)
        for name, value in (("val", val), ("test", test)):
            if isinstance(value, list):
                raise TypeError(f"`{name}` is a list: several {name} sets are a dict of named sets, each its own stream "
                                f"(`{name}={{'cub': cub, 'omniglot': omniglot}}`).")
            if isinstance(value, dict) and (not value or not all(isinstance(k, str) and k for k in value)):
                raise ValueError(f"Expected `{name}` as a dict to map set names (non-empty strings) to datasets, but got "
                                 f"the keys {list(value)}.")
        self.train, self.val, self.test = train, val, test
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        # "variable": drawn by the rule in training (None); None: as the evaluation episodes
        self.train_way: Optional[int] = None if train_way == VARIABLE else n_way if train_way is None else int(train_way)
        self.train_shot: Shot = None if train_shot == VARIABLE else n_shot if train_shot is None else train_shot  # type: ignore[assignment]
        self.train_query: Optional[int] = (None if train_query == VARIABLE else n_query if train_query is None
                                           else int(train_query))
        self.hierarchy = hierarchy
        self.pretrain_batch_size = pretrain_batch_size
        self._check_variable_sources()
        self.meta_batch_size = meta_batch_size
        self.eval_meta_batch_size = eval_meta_batch_size or meta_batch_size
        self.episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.samplers: dict[str, Any] = {}
        self._resume: Optional[dict] = None
        self._iterations = 0  # epochs counted without a trainer
        # the transform object is not saved: checkpoints hold plain data only, so they load with torch's default
        # weights_only=True whatever callable was passed (a RandomShift, a lambda)
        # (the VariableEpisodes as a dict: plain data too)
        self.save_hyperparameters(ignore=["train", "val", "test", "train_transform", "variable_episodes"])
        self.hparams["variable_episodes"] = dataclasses.asdict(rules) if rules is not None else None
        for name in ("n_shot", "train_shot"):  # a shot range as a list, as YAML writes it
            if isinstance(self.hparams[name], tuple):
                self.hparams[name] = list(self.hparams[name])

    # ---------------------------------------------------------------- setup and checks
    def sets(self, stage: str) -> dict[str, Any]:
        """The sources of ``"train"``, ``"val"`` or ``"test"`` by stream: ``{"val": ds}`` for one set, ``{"val/cub": cub,
        ...}`` for named sets, ``{}`` for none; ``{"train": [ds1, ds2]}`` (or the dict) for several training sources,
        one stream."""
        value = {"train": self.train, "val": self.val, "test": self.test}[stage]
        if value is None:
            return {}
        if isinstance(value, dict) and stage != "train":
            return {f"{stage}/{name}": source for name, source in value.items()}
        return {stage: value}

    def sources(self, stage: str) -> dict[str, Source]:
        """Every dataset of a stage by the name errors give it: :meth:`sets`, with several training sources apart
        (``{"train[0]": ds1, "train[1]": ds2}`` for a list, ``{"train/omniglot": ..., "train/glyphs": ...}`` for a
        dict)."""
        if stage == "train" and isinstance(self.train, list):
            return {f"train[{i}]": source for i, source in enumerate(self.train)}
        if stage == "train" and isinstance(self.train, dict):
            return {f"train/{name}": source for name, source in self.train.items()}
        return self.sets(stage)

    def _settings(self, stage: str) -> tuple[Optional[int], Shot, Optional[int]]:
        """``(way, shot, query)`` of a stage's episodes (``None``: drawn by the rule)."""
        if stage == "train":
            return self.train_way, self.train_shot, self.train_query
        return self.n_way, self.n_shot, self.n_query

    def _check_variable_sources(self) -> None:
        """Variable episodes are classification episodes: refused for task distributions, at construction."""
        stages = [s for s in STAGES if s != "train" or not self.pretrain_batch_size]
        variable = [s for s in stages if is_variable(*self._settings(s))]
        if self.variable_episodes is not None and not variable:
            rank_zero_warn("`variable_episodes` has no effect: `n_way`, `n_shot` and `n_query` (and the `train_*` "
                           "overrides) are all numbers, so every episode is N-way K-shot. Pass `None` for the "
                           "quantities its rules should draw (e.g. `n_way=None, n_shot=None, n_query=None`).")
        for stage in variable:
            for name, source in self.sources(stage).items():
                kind = source_kind(source)
                if kind != "classes":
                    prefix = "train_" if stage == "train" else "n_"
                    raise ValueError(
                        f"Variable episodes (`{prefix}way`, `{prefix}shot` or `{prefix}query` None, or a shot range) "
                        f"draw classes from labelled datasets, but `{name}` is {KIND_WORDS[kind]} ({_name(source)}): "
                        f"give `{prefix}way`, `{prefix}shot` and `{prefix}query` numbers for it.")

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        names = wanted.get(stage or "", ("train", "val", "test"))
        if stage == "fit" and self.train is None:
            raise ValueError("`trainer.fit` needs training episodes, but `EpisodicDataModule(train=None)`.")
        if stage in ("validate", "test") and not self.sets(names[0]):
            raise ValueError(f"`trainer.{stage}` needs {names[0]} episodes, but `EpisodicDataModule({names[0]}=None)`.")
        self._check_disjoint()
        for stage_name in names:
            way, shot, query = self._settings(stage_name)
            if stage_name == "train" and isinstance(self.train, (list, dict)) and "train" not in self.samplers:
                self.samplers["train"] = self._several_sources(way, shot, query)
                continue
            for stream, source in self.sets(stage_name).items():
                if stream in self.samplers:
                    continue
                self._check_source(stream, source, way)
                described = f"{stream} dataset ({_name(source)})"
                if stage_name == "train" and self.pretrain_batch_size:
                    self.samplers[stream] = ClassBatchSampler(source, self.seed, described)
                    self._check_pretrain_batches()
                    continue
                self.samplers[stream] = make_sampler(source, way, shot, query, self.seed, described,
                                                     self.variable_episodes, self.hierarchy)
                if stage_name != "train":
                    self._check_eval_batches(stream)

    def _several_sources(self, way, shot, query):
        """The training sampler over several sources: one source per episode, or, when pretraining, all of them as
        one labelled dataset with their classes numbered one source after another."""
        parts = {name.removeprefix("train/"): source for name, source in self.sources("train").items()}
        for name, source in parts.items():
            self._check_source("train", source, way, name)
        if self.pretrain_batch_size:
            check_same_inputs(parts, "training")
            sampler = ClassBatchSampler(ConcatClasses(list(parts.values())), self.seed, "training datasets")
            self.samplers["train"] = sampler
            self._check_pretrain_batches()
            return sampler
        samplers = [make_sampler(source, way, shot, query, self.seed, f"training source {name!r} ({_name(source)})",
                                 self.variable_episodes, self.hierarchy) for name, source in parts.items()]
        check_same_inputs(parts, "training")
        return MultiSourceSampler(samplers, list(parts), self.seed)

    @override
    def prepare_data(self) -> None:
        """Fetch what the datasets need (e.g. ``Omniglot(download=True)``), once, on the first process only."""
        for source in (source for stage in STAGES for source in self.sources(stage).values()):
            prepare = getattr(source, "prepare_data", None)
            if callable(prepare):
                prepare()

    def example_input(self, stream: str = "train") -> Tensor:
        """One input of the stream (the first item of its first episode or batch, without a batch dimension), as the
        dataset gives it: what a learner runs through its backbone once to learn the width of its embedding."""
        batch = self._sampler(stream).batch(_stage(stream), 0, [0])
        x = batch.x if isinstance(batch, LabelledBatch) else batch.task(0).support_x  # [n, ...]
        return x[0]

    def _check_eval_batches(self, stream: str) -> None:
        world, name = self._world()[0], _stage(stream)
        batches = math.ceil(self.episodes[name] / self.eval_meta_batch_size)
        if batches < world:
            raise ValueError(
                f"`{name}_episodes`={self.episodes[name]} in meta-batches of {self.eval_meta_batch_size} "
                f"(`eval_meta_batch_size`) gives {batches} {name} meta-batch(es) for {world} processes, so some "
                f"process would have none: raise `{name}_episodes` to at least {world * self.eval_meta_batch_size} "
                f"or lower `eval_meta_batch_size` to {max(self.episodes[name] // world, 1)}."
            )

    def _check_source(self, name: str, source, way: Optional[int], label: Optional[str] = None) -> None:
        """Checks of one source of stream ``name`` (``label``: its own name among several training sources)."""
        if not (callable(getattr(source, "sample", None)) or hasattr(source, "__getitem__")):
            raise TypeError(
                f"`{label or name}` must be a map-style dataset of (x, label) items or a task distribution with "
                f"`sample(rng, n_support, n_query)`, but got {type(source).__name__}."
            )
        if name == "train" and self.pretrain_batch_size:
            if source_kind(source) != "classes":
                raise ValueError(
                    f"`pretrain_batch_size` makes labelled batches of the training dataset's classes, but `train` is a "
                    f"{source_kind(source)} source ({_name(source)}): pretraining needs a labelled map-style dataset."
                )
            return
        if source_kind(source) == "classes" and way is not None and way < 2:
            arg = "train_way" if name == "train" and self.hparams["train_way"] else "n_way"
            raise ValueError(
                f"Expected `{arg}` to be an integer >= 2 for the "
                f"classification {name} dataset, but got {way}."
            )
        if name == "train" and not self.pretrain_batch_size and self.train_episodes_per_step > self.episodes["train"]:
            raise ValueError(
                f"`train_episodes`={self.episodes['train']} is smaller than one global meta-batch "
                f"(meta_batch_size {self.meta_batch_size} x {self._world()[0]} processes): raise `train_episodes`."
            )

    def _check_pretrain_batches(self) -> None:
        per_step, items = self.train_episodes_per_step, len(self.samplers["train"])
        if per_step > items:
            raise ValueError(
                f"`pretrain_batch_size`={self.pretrain_batch_size} x {self._world()[0]} processes = {per_step} examples "
                f"a step, but the training dataset has {items}: lower `pretrain_batch_size`."
            )

    @property
    def pretrain_classes(self) -> int:
        """The number of training classes C that pretraining batches label ``0..C-1`` (needs ``pretrain_batch_size``)."""
        if not self.pretrain_batch_size:
            raise ValueError("`pretrain_classes` is defined for pretraining batches only: set `pretrain_batch_size`.")
        return self._sampler("train").num_classes

    def _check_disjoint(self) -> None:
        """Training, validation and test classes must be disjoint (named sets of one stage may share classes). A
        class is identified by its name, where the source has names (``class_names``: folder names, ``ClassLabel``
        names, string labels); integer labels alone are not names, so splits numbered from 0 share nothing."""
        streams = {k: v for stage in STAGES for k, v in self.sources(stage).items()}  # every training source too
        keys = list(streams)
        names = {k: getattr(v, "class_names", None) for k, v in streams.items()}
        named = {k: set(v) for k, v in names.items() if v is not None}
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                if _stage(a) == _stage(b):
                    continue
                if streams[a] is streams[b] and not isinstance(streams[a], TaskDistribution):
                    raise ValueError(f"`{a}` and `{b}` are the same dataset: their classes must be disjoint.")
                shared = named[a] & named[b] if a in named and b in named else set()
                if shared:
                    some = ", ".join(sorted(map(str, shared))[:5])
                    raise ValueError(
                        f"The {a} and {b} datasets share {len(shared)} classes (e.g. {some}): meta-learning "
                        f"evaluates on unseen classes, so the splits must be disjoint. Give each split its own classes "
                        f"(other class folders, alphabets or `split`), or, if these are different classes that only "
                        f"share names, give them distinct `class_names`."
                    )

    # ---------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    @property
    def train_episodes_per_step(self) -> int:
        """The global meta-batch: tasks per optimizer step summed over all ranks (examples, when pretraining)."""
        return self._train_batch * self._world()[0]

    @property
    def _train_batch(self) -> int:
        """Tasks (examples, when pretraining) per training step on each rank."""
        return self.pretrain_batch_size or self.meta_batch_size

    def _train_items(self) -> int:
        """Training episodes per epoch, or examples per epoch when pretraining (one pass over the dataset)."""
        return len(self._sampler("train")) if self.pretrain_batch_size else self.episodes["train"]

    def steps_per_epoch(self) -> int:
        """Training meta-batches per epoch on each rank (known without iterating any loader)."""
        return self._train_items() // self.train_episodes_per_step

    def _sampler(self, stream: str):
        """The stream's sampler (``"train"``, ``"val"``, ``"test/cub"``...), set up on first use (outside a Trainer
        too)."""
        if stream not in self.samplers:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[_stage(stream)])
        if stream not in self.samplers:
            raise ValueError(f"No {stream} dataset was given to EpisodicDataModule, so there are no {stream} episodes.")
        return self.samplers[stream]

    def _loader(self, stream: str) -> DataLoader:
        sampler = self._sampler(stream)
        world, rank = self._world()
        stage = _stage(stream)  # named sets draw the episodes of their stage: each as it would alone
        batch = self._train_batch if stage == "train" else self.eval_meta_batch_size
        episodes = self._train_items() if stage == "train" else self.episodes[stage]
        transform = self.train_transform if stage == "train" else None
        stream_ds = _EpisodeStream(sampler, stage, episodes, batch, world, rank, transform, self.seed)
        if stage != "train":  # a plain DataLoader, which Lightning may rebuild (trainer.predict does)
            return DataLoader(stream_ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        return _EpisodeLoader(stream_ds, self.num_workers, self.pin_memory, self)

    def _eval_loaders(self, stage: str) -> Union[DataLoader, dict[str, DataLoader], list]:
        """One loader, a dict of named loaders (Lightning runs them one after another, each with its
        ``dataloader_idx``), or ``[]`` (Lightning's "no loader")."""
        value = {"val": self.val, "test": self.test}[stage]
        if value is None:
            return []
        if isinstance(value, dict):
            return {name: self._loader(f"{stage}/{name}") for name in value}
        return self._loader(stage)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    @override
    def val_dataloader(self) -> Union[DataLoader, dict[str, DataLoader], list]:
        return self._eval_loaders("val")  # no validation set: fit runs without validation

    @override
    def test_dataloader(self) -> Union[DataLoader, dict[str, DataLoader], list]:
        return self._eval_loaders("test")

    @override
    def predict_dataloader(self) -> Union[DataLoader, dict[str, DataLoader], list]:
        return self._eval_loaders("test")

    def _before_train_iter(self, stream: _EpisodeStream) -> None:
        trainer = self._trainer_or_none()
        if trainer is not None:
            epoch = trainer.current_epoch
        else:
            epoch, self._iterations = self._iterations, self._iterations + 1
        stream.epoch, stream.start = epoch, 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            done = self._resume["episodes_done"]
            per_step = stream.meta_batch * stream.world
            if done % per_step:
                raise ValueError(
                    f"Cannot resume: the checkpoint stopped after {done} training episodes of epoch {epoch}, which is "
                    f"not a whole number of global meta-batches of {per_step} (meta_batch_size x processes). Resume "
                    f"with a meta_batch_size x devices that divides {done}."
                )
            stream.start = done // per_step
            if stream.start >= len(stream):  # saved at the end of that epoch: the next epoch starts from its beginning
                stream.epoch, stream.start = epoch + 1, 0
        self._resume = None

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The sampler position: which epoch, and how many of its training episodes were consumed."""
        trainer = self._trainer_or_none()
        drawn = self._drawing()
        if trainer is None:
            return {"seed": self.seed, "epoch": self._iterations, "episodes_done": 0, **drawn}
        steps_done = trainer_view.batches_started(trainer)
        return {
            "seed": self.seed,
            "epoch": trainer.current_epoch,
            "episodes_done": steps_done * self.train_episodes_per_step,
            **drawn,
        }

    def _drawing(self) -> dict[str, Any]:
        """What the training episodes are drawn by besides the seed: the variable rules and the training sources (by
        name, in order), so that a resume with other ones is refused instead of drawing other episodes."""
        rules = self.variable_episodes
        return {"variable_episodes": dataclasses.asdict(rules) if rules is not None else None,
                "train_sources": list(self.sources("train"))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"The checkpoint was trained with EpisodicDataModule(seed={state_dict['seed']}) but this data module "
                f"has seed={self.seed}: resuming would draw different episodes. Use seed={state_dict['seed']}."
            )
        for key, now in self._drawing().items():  # checkpoints written before these were recorded have neither
            if key in state_dict and state_dict[key] != now:
                raise ValueError(
                    f"The checkpoint's training episodes were drawn with {key}={state_dict[key]} but this data module "
                    f"has {key}={now}: resuming would draw other episodes than the run it continues. Resume with the "
                    f"same {key.replace('_', ' ')} (or start a new run without ckpt_path).")
        self._resume = {"epoch": int(state_dict["epoch"]), "episodes_done": int(state_dict["episodes_done"])}
        self._iterations = int(state_dict["epoch"])

    def __repr__(self) -> str:
        rules = self.variable_episodes
        variable = rules is not None and any(is_variable(*self._settings(s)) for s in STAGES)
        return (
            f"EpisodicDataModule({_episodes(self.n_way, self.n_shot, self.n_query)}, train "
            f"{_episodes(self.train_way, self.train_shot, self.train_query)}, meta_batch_size={self.meta_batch_size}, "
            f"seed={self.seed}"
            + (f", variable episodes {rules}" + ("" if self.hierarchy else ", hierarchy=False") if variable else "")
            + (f", train sources {[k.split('/', 1)[-1] for k in self.sources('train')]}"
               if isinstance(self.train, (list, dict)) else "")
            + (f", pretrain_batch_size={self.pretrain_batch_size})" if self.pretrain_batch_size else ")")
        )


def _episodes(way, shot, query) -> str:
    """``"5-way 1-shot 15-query"``; ``variable-way``, ``1..5-shot`` for what is drawn."""
    shot = fixed_shot(shot) if fixed_shot(shot) is not None else shot
    shots = f"{shot[0]}..{shot[1]}" if isinstance(shot, (tuple, list)) else shot
    return " ".join(f"{'variable' if v is None else v}-{unit}" for v, unit in ((way, "way"), (shots, "shot"),
                                                                            (query, "query")))


def _rules(value) -> Optional[VariableEpisodes]:
    """``variable_episodes`` as :class:`VariableEpisodes` (a dict of its fields: how checkpoints and YAML hold it)."""
    if value is None or isinstance(value, VariableEpisodes):
        return value
    if isinstance(value, dict):
        fields = [f.name for f in dataclasses.fields(VariableEpisodes)]
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise TypeError(f"`variable_episodes` has the key(s) {unknown}, which VariableEpisodes does not take; its "
                            f"fields are {fields}.")
        return VariableEpisodes(**value)
    raise TypeError(f"Expected `variable_episodes` to be a VariableEpisodes (or a dict of its fields), but got "
                    f"{type(value).__name__}.")


def _check_quantity(name: str, value, rules: Optional[VariableEpisodes]) -> None:
    """``n_way``/``n_shot``/``n_query`` (or a ``train_*`` override): a number, or with ``variable_episodes`` ``None``
    (drawn by the rule) and, for shots, a pair ``(lo, hi)``."""
    shot = name.endswith("shot")
    if shot and isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"Expected `{name}` to be an integer, a pair (lo, hi) or None, but got {value!r}.")
        check_int(f"{name}[0]", value[0], 1)
        check_int(f"{name}[1]", value[1], value[0])
        if value[0] == value[1] or rules is not None:
            return
    elif value is not None:
        check_int(name, value, 1)
        return
    if rules is None:
        what = (f"`{name}=None` draws the {QUANTITIES[name.split('_')[-1]]} of each episode by Meta-Dataset's rule"
                if value is None else f"`{name}={tuple(value)}` draws the shots of each episode from a range")
        raise ValueError(f"{what}, which needs `variable_episodes`: pass `variable_episodes=VariableEpisodes()` (the "
                         f"reference's constants) or give `{name}` a number.")


VARIABLE = "variable"  # a train_* override drawn by the rule while evaluation episodes stay fixed
QUANTITIES = {"way": "ways", "shot": "shots", "query": "queries"}
KIND_WORDS = {"tasks": "a task distribution", "learn2learn": "a learn2learn task dataset", "classes": "a dataset"}
_NOT_DATASETS = (str, bytes, list, tuple, dict, int, float, Tensor)


def _as_train(train):
    """``train`` as one source, or several as a list or a dict of named sources, each checked to be a labelled
    dataset."""
    if isinstance(train, (list, tuple)) or (isinstance(train, dict) and type(train) is dict):
        if not train:
            raise ValueError(f"`train` is an empty {type(train).__name__}: give a labelled dataset, several (a list or a "
                             "dict of named datasets), or None for a run that only evaluates.")
        if isinstance(train, dict):
            bad = [k for k in train if not isinstance(k, str) or not k or "/" in k]
            if bad:
                raise ValueError(f"Expected `train` as a dict to map source names (non-empty strings without '/') to "
                                 f"datasets, but got the keys {list(train)}.")
            parts = {f"train/{k}": as_source(v) for k, v in train.items()}
        else:
            parts = {f"train[{i}]": as_source(v) for i, v in enumerate(train)}
        for name, source in parts.items():
            if source_kind(source) != "classes":
                raise TypeError(f"`{name}` is {KIND_WORDS[source_kind(source)]} ({_name(source)}): several training "
                                "sources must be labelled datasets (one source per episode, its classes drawn); give "
                                "a task distribution on its own.")
            if isinstance(source, _NOT_DATASETS) or not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
                raise TypeError(f"`{name}` must be a labelled map-style dataset of (x, label) items, but got "
                                f"{type(source).__name__}: each of several training sources is a dataset whose classes "
                                "its episodes draw.")
        values = list(parts.values())
        return dict(zip(train, values)) if isinstance(train, dict) else values
    return as_source(train)


def _name(source) -> str:
    return type(source).__name__


def _stage(stream: str) -> str:
    """``"test"`` for ``"test/cub"`` (and ``"train"`` for ``"train[1]"``): the stage a stream or source belongs to."""
    return stream.split("/", 1)[0].split("[", 1)[0]


STAGES = ("train", "val", "test")


__all__ = ["EpisodicDataModule", "Episode"]
