"""Meta-Dataset (Triantafillou et al., ICLR 2020) read from its own converted files, without TensorFlow.

A converted source is a folder holding ``dataset_spec.json`` and one ``{class_id}.tfrecords`` file per class, each
record a ``tf.train.Example`` with ``image`` (encoded bytes) and ``label`` (the class id). The spec is one of the
reference's three kinds (google-research/meta-dataset ``data/dataset_spec.py``, written by ``to_dict``, read back by
``as_dataset_spec``):

- ``DatasetSpecification``: ``classes_per_split`` (``TRAIN``/``VALID``/``TEST`` counts: a split's classes are the
  contiguous ids after the previous splits'), ``images_per_class`` (id -> count, or id -> ``{pool: count}``),
  ``class_names``;
- ``BiLevelDatasetSpecification`` (Omniglot): ``superclasses_per_split``, ``classes_per_superclass``,
  ``superclass_names``: a split's classes are its superclasses' classes, in order;
- ``HierarchicalDatasetSpecification`` (ImageNet): ``split_subgraphs`` (per split, the WordNet nodes as ``wn_id``,
  ``words``, ``children_ids``, ``parents_ids``), ``images_per_class`` per split keyed by WordNet id (every node: a leaf's
  count is its class's), ``class_names`` (id -> WordNet id; a split's leaves are contiguous ids).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_meta.data.datasets.base import CachedImageDataset, _size, load_images
from lightning_meta.data.datasets.cache import CacheArg
from lightning_meta.data.datasets.encoded import EncodedImages, PayloadDecoder, Store, check_store, index_records
from lightning_meta.data.datasets.tfrecord import encode_example, write_tfrecord

SPLITS = {"train": "TRAIN", "val": "VALID", "test": "TEST"}
KINDS = ("DatasetSpecification", "BiLevelDatasetSpecification", "HierarchicalDatasetSpecification")


def _spec_error(path: Any, what: str) -> ValueError:
    return ValueError(f"{path} is not a Meta-Dataset dataset_spec.json as the reference writes it: {what}. Use the "
                      "spec the conversion wrote beside the records (meta_dataset/dataset_conversion).")


def _int_keys(path: Any, table: Any, name: str) -> dict[int, Any]:
    if not isinstance(table, Mapping):
        raise _spec_error(path, f"`{name}` is a {type(table).__name__}, not a mapping")
    try:
        return {int(k): v for k, v in table.items()}
    except (TypeError, ValueError) as err:
        raise _spec_error(path, f"`{name}` has a key that is not a class number ({err})") from err


def _splits(path: Any, table: Any, name: str) -> dict[str, int]:
    if not isinstance(table, Mapping) or set(table) != set(SPLITS.values()):
        raise _spec_error(path, f"`{name}` must map TRAIN, VALID and TEST to counts, but holds {table!r}")
    return {split: int(table[key]) for split, key in SPLITS.items()}


def _count(value: Any) -> int:
    return sum(int(v) for v in value.values()) if isinstance(value, Mapping) else int(value)


@dataclass
class MetaDatasetSpec:
    """One Meta-Dataset source's specification, read from its ``dataset_spec.json`` (:meth:`read`).

    ``splits`` gives each split's class ids (``"train"``, ``"val"``, ``"test"``) in order; ``class_names`` maps every
    id to its name (ImageNet: the WordNet id); ``images_per_class`` the id's count (an int, or ``{pool: count}``);
    ``superclass_of`` (bi-level) each class id's superclass name; ``graphs`` (hierarchical) each split's WordNet graph
    as ``{node: [children]}``.

    Example:
        >>> spec = MetaDatasetSpec.from_dict({"__class__": "BiLevelDatasetSpecification", "name": "glyphs",
        ...     "superclasses_per_split": {"TRAIN": 1, "VALID": 1, "TEST": 0}, "classes_per_superclass": {"0": 2, "1": 1},
        ...     "superclass_names": {"0": "Greek", "1": "Latin"}, "images_per_class": {"0": 20, "1": 20, "2": 20},
        ...     "class_names": {"0": "alpha", "1": "beta", "2": "a"}, "path": "", "file_pattern": "{}.tfrecords"})
        >>> spec.splits, spec.superclass_of
        ({'train': [0, 1], 'val': [2], 'test': []}, {0: 'Greek', 1: 'Greek', 2: 'Latin'})
    """

    name: str
    kind: str
    class_names: dict[int, str]
    images_per_class: dict[int, Any]
    splits: dict[str, list[int]]
    file_pattern: str = "{}.tfrecords"
    superclass_of: Optional[dict[int, str]] = None
    graphs: Optional[dict[str, dict[str, list[str]]]] = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, path: Union[str, Path]) -> MetaDatasetSpec:
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as err:
            raise ValueError(f"Cannot read the dataset spec {path} ({err}): each Meta-Dataset source folder holds a "
                             "dataset_spec.json beside its records.") from err
        except ValueError as err:
            raise _spec_error(path, f"it is not JSON ({err})") from err
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Mapping, path: Any = "the dataset spec") -> MetaDatasetSpec:
        if not isinstance(data, Mapping) or data.get("__class__") not in KINDS:
            found = data.get("__class__") if isinstance(data, Mapping) else type(data).__name__
            raise _spec_error(path, f"its `__class__` is {found!r}, not one of {', '.join(KINDS)}")
        kind = data["__class__"]
        try:
            name, pattern = str(data["name"]), str(data.get("file_pattern", "{}.tfrecords"))
            names = {k: str(v) for k, v in _int_keys(path, data["class_names"], "class_names").items()}
            if pattern not in ("{}.tfrecords", "{}_{}.tfrecords"):
                raise _spec_error(path, f"`file_pattern` is {pattern!r}; the reference allows '{{}}.tfrecords' and "
                                        "'{}_{}.tfrecords'")
            if kind == "HierarchicalDatasetSpecification":
                return cls._hierarchical(data, path, name, pattern, names)
            counts = _int_keys(path, data["images_per_class"], "images_per_class")
            superclass_of = None
            if kind == "DatasetSpecification":
                per_split = _splits(path, data["classes_per_split"], "classes_per_split")
                starts = np.cumsum([0, per_split["train"], per_split["val"]])
                splits = {s: list(range(int(a), int(a) + per_split[s])) for s, a in zip(SPLITS, starts)}
            else:
                supers = _splits(path, data["superclasses_per_split"], "superclasses_per_split")
                per_super = _int_keys(path, data["classes_per_superclass"], "classes_per_superclass")
                super_names = {k: str(v) for k, v in _int_keys(path, data["superclass_names"],
                                                               "superclass_names").items()}
                superclass_of, splits, next_class, next_super = {}, {}, 0, 0
                for split in SPLITS:
                    splits[split] = []
                    for s in range(next_super, next_super + supers[split]):
                        if s not in per_super or s not in super_names:
                            raise _spec_error(path, f"superclass {s} has no `classes_per_superclass` or name")
                        ids = list(range(next_class, next_class + int(per_super[s])))
                        splits[split] += ids
                        superclass_of.update({c: super_names[s] for c in ids})
                        next_class += int(per_super[s])
                    next_super += supers[split]
        except KeyError as err:
            raise _spec_error(path, f"it has no `{err.args[0]}` field ({kind} has it)") from err
        for split, ids in splits.items():
            missing = [c for c in ids if c not in counts or c not in names]
            if missing:
                raise _spec_error(path, f"{split} class {missing[0]} has no `images_per_class` or `class_names` entry")
        return cls(name, kind, names, {c: counts[c] for c in counts}, splits, pattern, superclass_of, None, dict(data))

    @classmethod
    def _hierarchical(cls, data: Mapping, path: Any, name: str, pattern: str, names: dict[int, str]) -> MetaDatasetSpec:
        graphs, splits, counts = {}, {}, {}
        offset = 0
        for split, key in SPLITS.items():
            nodes = data["split_subgraphs"][key]
            per_node = data["images_per_class"][key]
            graph = {str(n["wn_id"]): [str(c) for c in n["children_ids"]] for n in nodes}
            leaves = sorted(wn for wn, children in graph.items() if not children)
            ids = list(range(offset, offset + len(leaves)))
            offset += len(leaves)
            found = sorted(names.get(c, f"<no class_names entry for {c}>") for c in ids)
            if found != leaves:
                odd = next(wn for wn in leaves if wn not in set(found))
                raise _spec_error(path, f"the {key} graph's leaf {odd} is not among `class_names` of ids "
                                        f"{ids[0]}..{ids[-1]} (a split's leaves are its contiguous class ids)")
            for c in ids:
                if names[c] not in per_node:
                    raise _spec_error(path, f"`images_per_class` of {key} has no count for leaf {names[c]}")
                counts[c] = int(per_node[names[c]])
            graphs[split], splits[split] = graph, ids
        return cls(name, "HierarchicalDatasetSpecification", names, counts, splits, pattern, None, graphs, dict(data))

    def count(self, class_id: int) -> int:
        """Images of a class (its pools added up)."""
        return _count(self.images_per_class[class_id])

    def class_files(self, root: Union[str, Path], class_id: int) -> list[Path]:
        """The record files of a class: ``{id}.tfrecords``; with ``'{}_{}.tfrecords'`` and pools, one per pool."""
        root = Path(root)
        if self.file_pattern == "{}.tfrecords":
            return [root / self.file_pattern.format(class_id)]
        pools = self.images_per_class[class_id]
        if not isinstance(pools, Mapping):
            raise ValueError(f"{self.name}: its file_pattern '{{}}_{{}}.tfrecords' splits each class into shards, which "
                             "the reference's reader does not read either ('Sharded files are not supported yet'): "
                             "convert with '{}.tfrecords'.")
        return [root / self.file_pattern.format(class_id, pool) for pool in pools]

    def pool_counts(self, class_id: int) -> list[int]:
        value = self.images_per_class[class_id]
        if self.file_pattern == "{}_{}.tfrecords" and isinstance(value, Mapping):
            return [int(v) for v in value.values()]
        return [_count(value)]


class MetaDatasetRecords(CachedImageDataset):
    """One split of one Meta-Dataset source, read from its converted records (no TensorFlow, no index files to make).

    Args:
        root: the source's folder: ``dataset_spec.json`` and one ``{class_id}.tfrecords`` per class.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: the side every image is resized to (Lanczos), as 3-channel RGB (as the reference decodes every
            source, Omniglot and QuickDraw included).
        store: ``"decoded"`` decodes every image once into the decoded-image cache (one memory-mapped ``uint8`` file per
            machine: the fastest sampling); ``"encoded"`` keeps the records as they are and decodes each item when an
            episode draws it, in the DataLoader workers (QuickDraw at 84 px would be 1 TB decoded); ``"auto"``
            (default) decodes when the decoded size fits under ``decoded_limit`` and logs its choice.
        cache: the cache folder (``True``: the default one) for the record index and the decoded images; ``False``
            decodes into memory (tiny sources) and keeps the index in a temporary folder.
        decoded_limit: bytes; default: half the free space of the cache's disk and half the memory, the smaller. It
            bounds what ``"auto"`` decodes: a decoded cache already there (or being built by another rank) is used.
        max_open_files: the record files a process keeps open at once (the encoded store reads with ``pread``).

    Labels are ``0..C-1`` over the split's classes in class-id order; ``class_names`` are the spec's (ImageNet: WordNet
    ids); the hierarchy is ``class_groups`` (Omniglot: alphabets) or ``class_dag`` (ImageNet: the split's WordNet graph),
    which :class:`~lightning_meta.data.EpisodicDataModule` samples variable episodes from. Every record's CRCs, its
    label and the per-class counts are checked (at decode time for the decoded store, at read time for the encoded
    one; the counts and frames when indexing): damage is an error naming the file and the record's byte offset.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> spec = {"__class__": "DatasetSpecification", "name": "toy", "classes_per_split": {"TRAIN": 2, "VALID": 1,
        ...         "TEST": 0}, "images_per_class": {"0": 2, "1": 3, "2": 2}, "class_names": {"0": "a", "1": "b", "2": "c"},
        ...         "path": str(root), "file_pattern": "{}.tfrecords"}
        >>> write_source(root, spec, lambda c, i: solid_jpeg(c, i))
        7
        >>> ds = MetaDatasetRecords(root, "train", image_size=8, store="encoded", cache=root / "cache")
        >>> ds.labels.tolist(), ds.class_names, tuple(ds.gather(torch.tensor([0, 4])).shape)
        ([0, 0, 1, 1, 1], ['a', 'b'], (2, 3, 8, 8))
    """

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 84, store: Store = "auto",
                 cache: CacheArg = True, decode_workers: Optional[int] = None, decoded_limit: Optional[int] = None,
                 max_open_files: int = 16) -> None:
        root = Path(root).expanduser().resolve()  # the index names its files: a later chdir must not lose them
        kind = type(self).__name__
        check_store(kind, store)
        if split not in SPLITS:
            raise ValueError(f"{kind}: expected `split` to be one of 'train', 'val', 'test', but got {split!r}.")
        if not (root / "dataset_spec.json").is_file():
            raise ValueError(f"{kind}: {root} holds no dataset_spec.json: pass the folder of one Meta-Dataset source "
                             "(its spec and its {class_id}.tfrecords files), e.g. records/ilsvrc_2012.")
        self.spec = spec = MetaDatasetSpec.read(root / "dataset_spec.json")
        ids = spec.splits[split]
        if not ids:
            used = [s for s in SPLITS if spec.splits[s]]
            raise ValueError(f"{kind}: {spec.name} has no {split} classes (Meta-Dataset uses it for "
                             f"{' and '.join(used) or 'nothing'} only): pick another split or source.")
        files, counts, file_labels, per_class = [], [], [], []
        for c in ids:
            paths, pools = spec.class_files(root, c), spec.pool_counts(c)
            files += [str(p) for p in paths]
            counts += pools
            file_labels += [c] * len(paths)
            per_class.append(sum(pools))
        items, index_file = index_records(f"{kind}-{spec.name}", files, counts, file_labels, cache, max_open_files)
        size = _size(image_size)
        decoder = PayloadDecoder(items, size, "RGB")
        images, cache_file = load_images(f"{kind}-{spec.name}-{split}", decoder, cache, decode_workers, store=store,
                                         decoded_limit=decoded_limit, max_open_files=max_open_files)
        labels = torch.from_numpy(np.repeat(np.arange(len(ids)), per_class))
        # the file a pickled copy maps its images from: the decoded cache, or (encoded) the index; none in memory
        super().__init__(images, labels, [spec.class_names[c] for c in ids],
                         index_file if isinstance(images, EncodedImages) else cache_file)
        self.split, self.class_ids, self.index_file = split, list(ids), index_file
        if spec.superclass_of is not None:
            self.class_groups = [spec.superclass_of[c] for c in ids]
        if spec.graphs is not None:
            self.class_dag = spec.graphs[split]

    @property
    def open_files(self) -> int:
        """Record files this process holds open now (at most ``max_open_files``; the decoded store holds none)."""
        images = self.images
        return images.open_files if hasattr(images, "open_files") else 0


# ------------------------------------------------------------------------------- writing sources (tests, conversion)


def solid_jpeg(class_id: int, i: int, size: int = 16) -> bytes:
    """A JPEG whose colour encodes ``(class_id, i)`` (red = class, green = item): fabricated records whose pixels say
    which record they came from."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (class_id * 37 % 256, i * 53 % 256, 128)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_source(root: Union[str, Path], spec: Mapping, image: Callable[[int, int], bytes],
                 classes: Optional[Sequence[int]] = None) -> int:
    """Write a Meta-Dataset source in the real format: ``root/dataset_spec.json`` (``spec``, as the reference's
    ``to_dict`` writes it) and, for every class the spec lists (or ``classes``), ``{id}.tfrecords`` with the spec's
    count of records, record ``i`` of class ``c`` holding ``image(c, i)`` and label ``c``. Returns the records written.
    For tests, benchmarks, and converting your own data to a source this package (and the reference) reads."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_spec.json").write_text(json.dumps(dict(spec)))
    parsed = MetaDatasetSpec.from_dict(spec)
    wanted = sorted({c for ids in parsed.splits.values() for c in ids}) if classes is None else list(classes)
    total = 0
    for c in wanted:
        start = 0
        for path, n in zip(parsed.class_files(root, c), parsed.pool_counts(c)):
            total += write_tfrecord(path, (encode_example({"image": [image(c, start + i)], "label": [c]})
                                           for i in range(n)))
            start += n
    return total


__all__ = ["MetaDatasetRecords", "MetaDatasetSpec", "solid_jpeg", "write_source"]
