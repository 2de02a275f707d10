"""Fabricated Meta-Dataset sources in the real format: the reference's real dataset_spec.json files (Meta-Dataset's
structure: ImageNet's WordNet graphs, Omniglot's alphabets, real class names) with every class shrunk to a few small
JPEGs whose colour says which record they are (``solid_jpeg``: red = class id, green = item)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lightning_meta.data.datasets.metadataset import solid_jpeg, write_source

SPECS = Path(__file__).resolve().parents[2] / "shared" / "data" / "metadataset_specs"
ALL_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower",
               "traffic_sign", "mscoco")


def real_spec(name: str) -> dict:
    """The reference's real spec of source ``name`` (e.g. ``"ilsvrc_2012"``) as a dict."""
    return json.loads((SPECS / f"{name}_dataset_spec.json").read_text())


def shrunk_spec(name: str, per_class: int) -> dict:
    """The real spec with every class holding ``per_class`` images (ImageNet: every node's count in every split)."""
    spec = copy.deepcopy(real_spec(name))
    counts = spec["images_per_class"]
    if spec["__class__"] == "HierarchicalDatasetSpecification":
        for split in counts.values():
            for k in split:
                split[k] = per_class
    else:
        for k in counts:
            counts[k] = per_class
    return spec


def fabricate(root: Path, name: str, per_class: int = 4, size: int = 8) -> Path:
    """Write source ``name`` under ``root/name`` with ``per_class`` JPEGs of ``size`` px per class; returns its folder."""
    folder = root / name
    if not (folder / "dataset_spec.json").exists():
        write_source(folder, shrunk_spec(name, per_class), lambda c, i: solid_jpeg(c, i, size))
    return folder


def flat_spec(name, counts, splits=None, pattern="{}.tfrecords"):
    """A DatasetSpecification as the reference's ``to_dict`` writes it: ``counts[c]`` images of class ``c`` (an int or
    ``{pool: count}``), ``splits`` classes for TRAIN, VALID, TEST (default: all train)."""
    train, val, test = splits or (len(counts), 0, 0)
    return {"__class__": "DatasetSpecification", "name": name,
            "classes_per_split": {"TRAIN": train, "VALID": val, "TEST": test},
            "images_per_class": {str(c): n for c, n in enumerate(counts)},
            "class_names": {str(c): f"class{c}" for c in range(len(counts))}, "path": "", "file_pattern": pattern}


def small_source(root, counts=(3, 3, 3), size=8):
    write_source(root, flat_spec("tiny", list(counts)), lambda c, i: solid_jpeg(c, i, size))
    return root
