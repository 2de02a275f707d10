"""Meta-Dataset's protocol as one data module over a folder of converted records (Triantafillou et al., ICLR 2020):
training on the "all sources" selection (episodes uniform over 8 sources, one source per episode), validation on
ImageNet's validation classes, tests on each of 10 sources, logged per source."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union, cast

from torch import Tensor
from torch.utils.data import Dataset

from lightning_meta.data.datamodule import STAGES, EpisodicDataModule, _episodes
from lightning_meta.data.datasets.cache import CacheArg, CacheFile
from lightning_meta.data.datasets.encoded import Store, check_store
from lightning_meta.data.datasets.metadataset import MetaDatasetRecords, MetaDatasetSpec
from lightning_meta.data.variable import Shot, VariableEpisodes

# the reference's "all sources" training (learn/gin/setups/all.gin) and its 10 test sources
TRAIN_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower")
VAL_SOURCES = ("ilsvrc_2012",)
TEST_SOURCES = (*TRAIN_SOURCES, "traffic_sign", "mscoco")


class _RecordsSplit(Dataset):
    """One split of one converted source as :class:`~lightning_meta.data.MetaDatasetRecords`, built on first use of
    its items or labels (the data module's ``setup``, in the process that samples): constructing the data module reads
    the specs only, and a run builds only the splits its stage draws (``test`` never indexes or decodes ImageNet's
    training records). Class names, the hierarchy (``class_groups``/``class_dag``) and the length come from the spec.
    """

    def __init__(self, root: Path, split: str, spec: MetaDatasetSpec, options: dict[str, Any]) -> None:
        self.root, self.split, self.spec, self.options = root, split, spec, options
        ids = spec.splits[split]
        self.class_names = [spec.class_names[c] for c in ids]
        self.class_groups = [spec.superclass_of[c] for c in ids] if spec.superclass_of is not None else None
        self.class_dag = spec.graphs[split] if spec.graphs is not None else None
        self._length = sum(spec.count(c) for c in ids)
        self._dataset: Optional[MetaDatasetRecords] = None

    @property
    def dataset(self) -> MetaDatasetRecords:
        """The split's records (indexed, and decoded where the store says so, on first access)."""
        if self._dataset is None:
            self._dataset = MetaDatasetRecords(self.root, self.split, **self.options)
        return self._dataset

    @property
    def labels(self) -> Tensor:
        return self.dataset.labels

    @property
    def cache_file(self) -> Optional[CacheFile]:
        """The split's decoded cache, or (encoded store) its index: what ``prune_cache`` keeps (builds the split)."""
        return self.dataset.cache_file

    @property
    def index_file(self) -> Optional[CacheFile]:
        """The split's record index (builds the split)."""
        return self.dataset.index_file

    def gather(self, indices: Tensor) -> Tensor:
        """``[len(indices), 3, H, W]`` uint8 images."""
        return self.dataset.gather(indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[index]

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"{self.spec.name}[{self.split}] ({len(self.class_names)} classes, {self._length} images, {self.root})"


class MetaDatasetDataModule(EpisodicDataModule):
    """Meta-Dataset as its users run it: every source a sub-folder of ``records`` (the reference's converted records,
    ``records/ilsvrc_2012``, ``records/omniglot``...), read by :class:`~lightning_meta.data.MetaDatasetRecords`.

    Training episodes draw one source uniformly, then its classes (:class:`~lightning_meta.data.EpisodicDataModule`
    with several training sources), from each source's training split; validation and test sets are named by source,
    each its own stream of episodes from that source's ``VALID``/``TEST`` split, so a test logs ``test/<source>/acc``
    and ``test/<source>/acc_ci95`` (the 95% interval over its ``test_episodes`` episodes) per source, and ``test/acc``
    their mean (``val/acc`` likewise, what ``ModelCheckpoint(monitor="val/acc")`` reads). Episodes are Meta-Dataset's
    variable-way, variable-shot ones by default, drawn within one alphabet (Omniglot) or one WordNet node (ImageNet).

    Args:
        records: the folder holding one sub-folder per converted source (``dataset_spec.json`` and its
            ``{class_id}.tfrecords``): the one thing a run on another machine changes (``--data.records=/path``).
        train_sources: the sources whose training classes train (default: the reference's "all sources" 8).
        val_sources: the sources whose validation classes validate (default: ImageNet's, as the reference).
        test_sources: the sources whose test classes are tested, each on ``test_episodes`` episodes (default: the 10
            of the leaderboard; converted MNIST, CIFAR-10 and CIFAR-100 folders, e.g. ``mnist``, may be added).
            Any of the three may be empty (a run without that stage).
        image_size, store, cache, decoded_limit, decode_workers, max_open_files: of every source's
            :class:`~lightning_meta.data.MetaDatasetRecords` (``store="auto"``: decoded where it fits, else encoded).
        n_way, n_shot, n_query, variable_episodes: ``None`` draws that quantity by Meta-Dataset's rules (the
            reference's constants: :class:`~lightning_meta.data.VariableEpisodes`); numbers fix it.
        Others: as :class:`~lightning_meta.data.EpisodicDataModule` (``test_episodes`` per test source).

    Constructing it reads the specs only (a missing source folder, or a source without classes in the split a stage
    reads, is an error then, before any work); each split's records are indexed (and decoded, by the store) when a
    stage that draws from them is set up, so ``trainer.test`` never touches the training records.

    Example:
        >>> import tempfile
        >>> MetaDatasetDataModule(tempfile.mkdtemp())  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: MetaDatasetDataModule: ... has no converted source 'ilsvrc_2012' (no .../ilsvrc_2012/dataset_spec.json;
        named in `train_sources`, `val_sources`, `test_sources`). Convert it there ...
    """

    def __init__(
        self,
        records: Union[str, Path],
        train_sources: Sequence[str] = TRAIN_SOURCES,
        val_sources: Sequence[str] = VAL_SOURCES,
        test_sources: Sequence[str] = TEST_SOURCES,
        image_size: int = 84,
        store: Store = "auto",
        cache: CacheArg = True,
        decoded_limit: Optional[int] = None,
        decode_workers: Optional[int] = None,
        max_open_files: int = 16,
        n_way: Optional[int] = None,
        n_shot: Shot = None,
        n_query: Optional[int] = None,
        variable_episodes: Union[VariableEpisodes, dict[str, Any], None] = VariableEpisodes(),  # noqa: B008 (frozen)
        meta_batch_size: int = 1,
        train_episodes: int = 1000,
        val_episodes: int = 600,
        test_episodes: int = 600,
        train_way: Union[int, str, None] = None,
        train_shot: Union[Shot, str] = None,
        train_query: Union[int, str, None] = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        eval_meta_batch_size: Optional[int] = None,
        train_transform: Optional[Callable] = None,
        hierarchy: bool = True,
    ) -> None:
        kind = type(self).__name__
        check_store(kind, store)
        chosen = {"train_sources": train_sources, "val_sources": val_sources, "test_sources": test_sources}
        named = {arg: _source_names(kind, arg, value) for arg, value in chosen.items()}
        root = Path(records).expanduser()
        if not root.is_dir():
            raise ValueError(f"{kind}: `records` {root} is not a folder: pass the folder that holds one sub-folder per "
                             "converted Meta-Dataset source (records/ilsvrc_2012, records/omniglot, ...), e.g. "
                             "`--data.records=/path/to/records`.")
        specs = _read_specs(kind, root, named)
        options = {"image_size": image_size, "store": store, "cache": cache, "decoded_limit": decoded_limit,
                   "decode_workers": decode_workers, "max_open_files": max_open_files}
        sets: dict[str, Optional[dict[str, Any]]] = {}
        for stage in STAGES:  # each stage reads its own split of its sources
            sets[stage] = {n: _RecordsSplit(root / n, stage, specs[n], options) for n in named[f"{stage}_sources"]} or None
        records = str(records)  # the hyperparameters keep plain data (checkpoints load under weights_only)
        train_sources, val_sources, test_sources = (list(named[a]) for a in chosen)
        super().__init__(
            train=sets["train"], val=sets["val"], test=sets["test"], n_way=n_way, n_shot=n_shot, n_query=n_query,
            meta_batch_size=meta_batch_size, train_episodes=train_episodes, val_episodes=val_episodes,
            test_episodes=test_episodes, train_way=train_way, train_shot=train_shot, train_query=train_query,
            seed=seed, num_workers=num_workers, pin_memory=pin_memory, eval_meta_batch_size=eval_meta_batch_size,
            train_transform=train_transform, variable_episodes=variable_episodes, hierarchy=hierarchy)
        self.records = root
        if isinstance(self.hparams.get("cache"), Path):
            self.hparams["cache"] = str(cache)

    def __repr__(self) -> str:
        sources = ", ".join(f"{stage} {[k.split('/', 1)[1] for k in self.sources(stage)]}" for stage in STAGES)
        rules = f", variable episodes {self.variable_episodes}" if self.variable_episodes is not None else ""
        return (f"{type(self).__name__}(records={str(self.records)!r}, {sources}, image_size="
                f"{self.hparams['image_size']}, store={self.hparams['store']!r}, "
                f"{_episodes(self.n_way, self.n_shot, self.n_query)}, train "
                f"{_episodes(self.train_way, self.train_shot, self.train_query)}, meta_batch_size={self.meta_batch_size}, "
                f"seed={self.seed}{rules})")

    def __str__(self) -> str:  # Lightning's would build every loader (decode every source) to print their sizes
        return repr(self)

    def _check_disjoint(self) -> None:
        """Within a source, a stage reads its own split, whose class ids the spec keeps apart from the others' (checked
        here). Across sources, names may repeat on purpose: 23 of QuickDraw's training classes share their names with
        MSCOCO's test classes ("airplane": drawings in one, photographs in the other), as the protocol has them."""
        seen: dict[str, dict[str, set]] = {}
        for stage in STAGES:
            for name, value in self.sources(stage).items():
                own, source = name.split("/", 1)[1], cast(_RecordsSplit, value)
                ids = set(source.spec.splits[source.split])
                for other, theirs in seen.get(own, {}).items():
                    if ids & theirs:
                        raise ValueError(f"The {other} and {stage} splits of Meta-Dataset source {own!r} share class ids "
                                         f"{sorted(ids & theirs)[:5]}: its dataset_spec.json is not a valid split.")
                seen.setdefault(own, {})[stage] = ids


def _source_names(kind: str, arg: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{kind}: expected `{arg}` to be a list of source names (sub-folders of `records`, e.g. "
                        f"['omniglot', 'aircraft']), but got {value!r}.")
    names = tuple(value)
    bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"{kind}: `{arg}` names sources by their folder under `records` (e.g. 'omniglot'), but got "
                         f"{bad[0]!r}.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{kind}: `{arg}` names {twice[0]!r} more than once: name each source once.")
    return names


def _read_specs(kind: str, root: Path, named: dict[str, tuple[str, ...]]) -> dict[str, MetaDatasetSpec]:
    """Every named source's spec, read once; a missing folder or a source without classes in a stage's split is an
    error naming the folder and the argument that names it."""
    specs: dict[str, MetaDatasetSpec] = {}
    by = {n: [a for a, names in named.items() if n in names] for names in named.values() for n in names}
    for name, args in by.items():
        spec_file = root / name / "dataset_spec.json"
        if not spec_file.is_file():
            present = sorted(p.name for p in root.iterdir() if (p / "dataset_spec.json").is_file())
            listed = ", ".join(f"`{a}`" for a in args)
            raise ValueError(
                f"{kind}: {root} has no converted source {name!r} (no {spec_file}; named in {listed}). Convert it "
                f"there (meta_dataset/dataset_conversion), remove it from {listed}, or point `--data.records` at the "
                f"folder that holds it (sources found in {root}: {', '.join(present) or 'none'}).")
        specs[name] = spec = MetaDatasetSpec.read(spec_file)
        for arg in args:
            split = arg.removesuffix("_sources")  # each stage reads its split of its sources
            if not spec.splits[split]:
                used = [s for s, ids in spec.splits.items() if ids]
                raise ValueError(f"{kind}: source {name!r} has no {split} classes (Meta-Dataset uses it for "
                                 f"{' and '.join(used) or 'nothing'} only): remove it from `{arg}`.")
    return specs


__all__ = ["MetaDatasetDataModule", "TEST_SOURCES", "TRAIN_SOURCES", "VAL_SOURCES"]
