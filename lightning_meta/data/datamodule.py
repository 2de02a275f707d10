"""EpisodicDataModule: episodes for training, validation and testing, seeded, rank-aware and resumable."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from typing_extensions import override

from lightning_meta import trainer_view
from lightning_meta._checks import check_int
from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.data.sampler import ClassBatchSampler
from lightning_meta.data.sources import as_source, as_sources, make_sampler, source_kind
from lightning_meta.data.tasks import TaskDistribution

Source = Union[Dataset, TaskDistribution]
EvalSources = Union[Source, dict[str, Source]]


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
            draws its episodes as it would alone.
        n_way, n_shot, n_query: evaluation episodes are N-way K-shot with Q queries per class.
        meta_batch_size: tasks per optimizer step on each rank (the global meta-batch is this times world size).
        train_episodes: training episodes per epoch, over all ranks together.
        val_episodes, test_episodes: the fixed evaluation episodes.
        train_way, train_shot, train_query: training overrides (default to the evaluation values), e.g. 60-way
            training for 5-way tests as in the Prototypical Networks paper.
        seed: fixes every episode. Training episodes are a pure function of (seed, epoch, position); validation and
            test episodes are the same on every run, epoch, rank count and worker count.
        num_workers: DataLoader workers (episodes do not depend on it).
        eval_meta_batch_size: tasks per evaluation batch (defaults to ``meta_batch_size``).
        train_transform: augmentation of training inputs, ``(x [B, n, ...], generator) -> x`` (e.g.
            :class:`~lightning_meta.data.RandomShift`), drawn from a generator that is a pure function of (seed, epoch,
            position), so augmented runs are reproducible and resume exactly. Evaluation episodes are never augmented.
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
    """

    def __init__(
        self,
        train: Optional[Source] = None,
        val: Optional[EvalSources] = None,
        test: Optional[EvalSources] = None,
        n_way: int = 5,
        n_shot: int = 1,
        n_query: int = 15,
        meta_batch_size: int = 1,
        train_episodes: int = 1000,
        val_episodes: int = 100,
        test_episodes: int = 600,
        train_way: Optional[int] = None,
        train_shot: Optional[int] = None,
        train_query: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        eval_meta_batch_size: Optional[int] = None,
        train_transform: Optional[Callable] = None,
        pretrain_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if train_transform is not None and not callable(train_transform):
            raise TypeError(f"`train_transform` must be a callable (x, generator) -> x such as RandomShift(3), but got "
                            f"{type(train_transform).__name__}.")
        self.train_transform = train_transform
        for name, minimum in (
            ("n_way", 1), ("n_shot", 1), ("n_query", 1), ("meta_batch_size", 1), ("train_episodes", 1),
            ("val_episodes", 1), ("test_episodes", 1), ("seed", 0), ("num_workers", 0),
        ):  # fmt: skip
            check_int(name, locals()[name], minimum)
        for name in ("train_way", "train_shot", "train_query", "eval_meta_batch_size", "pretrain_batch_size"):
            if locals()[name] is not None:
                check_int(name, locals()[name], 1)
        if train is None and val is None and test is None:
            raise ValueError("EpisodicDataModule needs at least one of `train`, `val` or `test`; all three are None.")
        train, val, test = as_source(train), as_sources(val), as_sources(test)
        for name, value in (("val", val), ("test", test)):
            if isinstance(value, dict) and (not value or not all(isinstance(k, str) and k for k in value)):
                raise ValueError(f"Expected `{name}` as a dict to map set names (non-empty strings) to datasets, but got "
                                 f"the keys {list(value)}.")
        self.train, self.val, self.test = train, val, test
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.train_way = train_way or n_way
        self.train_shot = train_shot or n_shot
        self.train_query = train_query or n_query
        self.meta_batch_size = meta_batch_size
        self.pretrain_batch_size = pretrain_batch_size
        self.eval_meta_batch_size = eval_meta_batch_size or meta_batch_size
        self.episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.samplers: dict[str, Any] = {}
        self._resume: Optional[dict] = None
        self._iterations = 0  # epochs counted without a trainer
        # the transform object is not saved: checkpoints hold plain data only, so they load with torch's default
        # weights_only=True whatever callable was passed (a RandomShift, a lambda)
        self.save_hyperparameters(ignore=["train", "val", "test", "train_transform"])

    # ---------------------------------------------------------------- setup and checks
    def sets(self, stage: str) -> dict[str, Source]:
        """The sources of ``"train"``, ``"val"`` or ``"test"`` by stream: ``{"val": ds}`` for one set, ``{"val/cub": cub,
        ...}`` for named sets, ``{}`` for none."""
        value = {"train": self.train, "val": self.val, "test": self.test}[stage]
        if value is None:
            return {}
        if isinstance(value, dict):
            return {f"{stage}/{name}": source for name, source in value.items()}
        return {stage: value}

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
            for stream, source in self.sets(stage_name).items():
                if stream in self.samplers:
                    continue
                way, shot, query = (
                    (self.train_way, self.train_shot, self.train_query) if stage_name == "train" else
                    (self.n_way, self.n_shot, self.n_query)
                )  # fmt: skip
                self._check_source(stream, source, way)
                described = f"{stream} dataset ({_name(source)})"
                if stage_name == "train" and self.pretrain_batch_size:
                    self.samplers[stream] = ClassBatchSampler(source, self.seed, described)
                    self._check_pretrain_batches()
                    continue
                self.samplers[stream] = make_sampler(source, way, shot, query, self.seed, described)
                if stage_name != "train":
                    self._check_eval_batches(stream)

    @override
    def prepare_data(self) -> None:
        """Fetch what the datasets need (e.g. ``Omniglot(download=True)``), once, on the first process only."""
        for source in (source for stage in STAGES for source in self.sets(stage).values()):
            prepare = getattr(source, "prepare_data", None)
            if callable(prepare):
                prepare()

    def example_input(self, stream: str = "train") -> Tensor:
        """One input of the stream (the first item of its first episode or batch, without a batch dimension), as the
        dataset gives it: what a learner runs through its backbone once to learn the width of its embedding."""
        batch = self._sampler(stream).batch(_stage(stream), 0, [0])
        x = batch.x if isinstance(batch, LabelledBatch) else batch.support_x[0]
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

    def _check_source(self, name: str, source, way: int) -> None:
        if not (callable(getattr(source, "sample", None)) or hasattr(source, "__getitem__")):
            raise TypeError(
                f"`{name}` must be a map-style dataset of (x, label) items or a task distribution with "
                f"`sample(rng, n_support, n_query)`, but got {type(source).__name__}."
            )
        if name == "train" and self.pretrain_batch_size:
            if source_kind(source) != "classes":
                raise ValueError(
                    f"`pretrain_batch_size` makes labelled batches of the training dataset's classes, but `train` is a "
                    f"{source_kind(source)} source ({_name(source)}): pretraining needs a labelled map-style dataset."
                )
            return
        if source_kind(source) == "classes" and way < 2:
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
        streams = {k: v for stage in STAGES for k, v in self.sets(stage).items()}
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
        if trainer is None:
            return {"seed": self.seed, "epoch": self._iterations, "episodes_done": 0}
        steps_done = trainer_view.batches_started(trainer)
        return {
            "seed": self.seed,
            "epoch": trainer.current_epoch,
            "episodes_done": steps_done * self.train_episodes_per_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"The checkpoint was trained with EpisodicDataModule(seed={state_dict['seed']}) but this data module "
                f"has seed={self.seed}: resuming would draw different episodes. Use seed={state_dict['seed']}."
            )
        self._resume = {"epoch": int(state_dict["epoch"]), "episodes_done": int(state_dict["episodes_done"])}
        self._iterations = int(state_dict["epoch"])

    def __repr__(self) -> str:
        return (
            f"EpisodicDataModule({self.n_way}-way {self.n_shot}-shot {self.n_query}-query, train "
            f"{self.train_way}-way {self.train_shot}-shot, meta_batch_size={self.meta_batch_size}, seed={self.seed}"
            + (f", pretrain_batch_size={self.pretrain_batch_size})" if self.pretrain_batch_size else ")")
        )


def _name(source) -> str:
    return type(source).__name__


def _stage(stream: str) -> str:
    """``"test"`` for ``"test/cub"``: the stage a stream belongs to."""
    return stream.split("/", 1)[0]


STAGES = ("train", "val", "test")


__all__ = ["EpisodicDataModule", "Episode"]
