"""miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class splits."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Union

import torch

from lightning_meta._checks import check_choice
from lightning_meta.data.datasets.base import FileDecoder, _size, load_images
from lightning_meta.data.datasets.cache import CacheArg
from lightning_meta.data.datasets.encoded import Store, check_store
from lightning_meta.data.datasets.folder import ImageFileDataset

SPLITS = ("train", "val", "test")


class MiniImageNet(ImageFileDataset):
    """The standard csv splits over an images folder: ``root/{train,val,test}.csv`` (``filename,label`` rows) and
    ``root/images/<filename>``. Images are resized to ``image_size`` (84 in the papers) and kept as uint8 RGB in the
    decoded-image cache (``cache`` and ``decode_workers`` as for :class:`ClassFolder`); ``store="encoded"`` keeps them
    encoded in a pack and decodes each item when an episode draws it, ``"auto"`` picks by size (``store``,
    ``decoded_limit`` and ``max_open_files`` as for :class:`ClassFolder`).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "images").mkdir()
        >>> rows = ["filename,label"]
        >>> for i, wnid in enumerate(["n01532829", "n01532829", "n01558993"]):
        ...     Image.new("RGB", (100, 90)).save(root / "images" / f"{wnid}{i:08d}.jpg")
        ...     rows.append(f"{wnid}{i:08d}.jpg,{wnid}")
        >>> _ = (root / "test.csv").write_text(chr(10).join(rows))
        >>> ds = MiniImageNet(root, "test", image_size=84)
        >>> ds.class_names, tuple(ds.images.shape)
        (['n01532829', 'n01558993'], (3, 3, 84, 84))
    """

    def __init__(self, root: Union[str, Path], split: str = "train", image_size: int = 84, cache: CacheArg = True,
                 decode_workers: Optional[int] = None, store: Store = "decoded", decoded_limit: Optional[int] = None,
                 max_open_files: int = 16) -> None:
        root = Path(root)
        check_choice("split", split, SPLITS)
        check_store("MiniImageNet", store)
        table = root / f"{split}.csv"
        if not table.is_file():
            raise ValueError(
                f"MiniImageNet split file {table} not found: `root` must hold the Ravi & Larochelle csv files "
                "(train.csv, val.csv, test.csv) and an `images/` folder."
            )
        with open(table, newline="") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader if row]  # (line number, row): blank lines skipped
        if lines and lines[0][1][:2] == ["filename", "label"]:
            lines = lines[1:]
        if not lines:
            raise ValueError(f"MiniImageNet split file {table} lists no images.")
        first: dict[str, int] = {}
        for line, row in lines:
            if len(row) < 2:
                raise ValueError(f"Line {line} of {table} is not a `filename,label` row: {row}.")
            if row[0] in first:  # one image twice: the published csv files list each image once
                raise ValueError(f"Line {line} of {table} lists {row[0]} again (first on line {first[row[0]]}): each "
                                 "row is one image, remove the repeated row.")
            first[row[0]] = line
        rows = [row[:2] for _, row in lines]
        names = sorted({label for _, label in rows})
        index = {name: i for i, name in enumerate(names)}
        files = []
        for filename, _ in rows:
            path = root / "images" / filename
            if not path.is_file():
                raise ValueError(f"MiniImageNet image {path} (listed in {table}) does not exist.")
            files.append(str(path))
        labels = torch.tensor([index[label] for _, label in rows])
        images, cache_file = load_images("MiniImageNet", FileDecoder(files, _size(image_size), "RGB"), cache,
                                         decode_workers, store=store, decoded_limit=decoded_limit,
                                         max_open_files=max_open_files)
        super().__init__(images, labels, names, cache_file)
        self._keep_files(files)
