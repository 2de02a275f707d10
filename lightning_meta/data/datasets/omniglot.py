"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): 1,623 handwritten characters from 50 alphabets, 20 drawers each."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from lightning_meta._checks import check_choice
from lightning_meta.data.datasets.base import CachedImageDataset, FileDecoder, _size, load_images
from lightning_meta.data.datasets.cache import CacheArg
from lightning_meta.data.datasets.encoded import Store, check_store

OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
# md5 of the authors' zips
CHECKSUMS = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
SPLITS = ("train", "val", "test")


def download(root: Union[str, Path], subset: str, url: str = OFFICIAL_URL) -> Path:
    """Fetch ``subset``'s zip into ``root`` (skipped when present) and verify its md5. It is written to a temporary
    file in ``root`` and renamed only when whole and verified, so an interrupted download (or a second process
    downloading at once) never leaves a partial zip under the real name; the temporary file is removed on any
    failure, an interruption included."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{subset}.zip"
    if target.exists():
        return target
    source = url.rstrip("/") + f"/{subset}.zip"
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{subset}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(source, timeout=60) as response:
                    shutil.copyfileobj(response, out)
            except OSError as err:
                raise RuntimeError(f"Could not download Omniglot from {source}: {err}.") from err
        digest = _md5(Path(tmp))
        if digest != CHECKSUMS[subset]:
            raise RuntimeError(
                f"The download of {source} is corrupt (md5 {digest}, expected {CHECKSUMS[subset]}); try again."
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


class Omniglot(CachedImageDataset):
    """Omniglot characters as classes, decoded once per machine (strokes bright on black, ``uint8 [1, S, S]``).

    Args:
        root: folder holding the authors' zips (``images_background.zip`` ...) or their extracted folders.
        subsets: which of ``images_background``, ``images_evaluation``, ``images_background_small1``,
            ``images_background_small2`` to read.
        alphabets: keep only these alphabets (folder names such as ``"Greek"``); ``None`` keeps all.
        image_size: side of the square images (28 in most papers).
        rotations: rotations in degrees, each a class of its own (Santoro et al. 2016; Vinyals et al. 2016 use
            ``(0, 90, 180, 270)`` for training).
        split: ``"train"``, ``"val"`` or ``"test"`` keeps a disjoint share of the characters (by ``split_fractions``,
            shuffled by ``split_seed``); rotations of one character always stay in the same split.
        download: fetch the missing zips from ``url`` (default: the authors' repository) into ``root`` and verify
            their md5. Each zip is written under a temporary name and renamed when whole, and images are read from the
            zip itself (never from a half-extracted folder). With ``download=True`` nothing is fetched or read at
            construction: :class:`~lightning_meta.EpisodicDataModule` calls :meth:`prepare_data` on one process
            before any process reads the images, and a dataset used on its own loads on first use.
        cache, decode_workers: the decoded-image cache, as for :class:`~lightning_meta.data.ClassFolder` (rotated
            copies are part of the cached images).
        store, decoded_limit, max_open_files: as for :class:`~lightning_meta.data.ClassFolder` (default
            ``"decoded"``): ``"encoded"`` copies the images' bytes once out of the zips into a pack and decodes each
            item when drawn; rotated copies are images of their own, which only the decoded store holds, so
            ``rotations`` other than ``(0,)`` need ``store="decoded"`` (``"auto"`` then decodes).

    Example (on the project's copy of the authors' data when it is there; a user's clone has none):
        >>> from pathlib import Path
        >>> root = Path("../shared/data/omniglot")
        >>> ds = Omniglot(root, ["images_background_small1"], ["Greek"], rotations=(0, 90)) if root.is_dir() else None
        >>> ds is None or (ds.num_classes, tuple(ds.images.shape)) == (48, (960, 1, 28, 28))
        True
        >>> ds is None or (ds.class_names[1], ds.class_groups[1]) == ("Greek/character01/rot90", "Greek")
        True
    """

    def __init__(
        self,
        root: Union[str, Path],
        subsets: Sequence[str] = ("images_background",),
        alphabets: Optional[Sequence[str]] = None,
        image_size: int = 28,
        rotations: Sequence[int] = (0,),
        split: Optional[str] = None,
        split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        download: bool = False,
        url: str = OFFICIAL_URL,
        cache: CacheArg = True,
        decode_workers: Optional[int] = None,
        store: Store = "decoded",
        decoded_limit: Optional[int] = None,
        max_open_files: int = 16,
    ) -> None:
        root = Path(root)
        check_store("Omniglot", store)
        if isinstance(subsets, str):
            subsets = [subsets]
        unknown = [s for s in subsets if s not in CHECKSUMS]
        if unknown:
            raise ValueError(f"Unknown Omniglot subset {unknown[0]!r}: expected one of {sorted(CHECKSUMS)}.")
        bad_rot = [r for r in rotations if r not in (0, 90, 180, 270)]
        if bad_rot or not rotations:
            raise ValueError(f"Expected `rotations` to be a non-empty subset of (0, 90, 180, 270), but got {rotations}.")
        if tuple(rotations) != (0,):
            if store == "encoded":
                raise ValueError(f"Omniglot: `rotations={tuple(rotations)}` adds a rotated copy of every image, which "
                                 "only the decoded store holds: pass `store='decoded'`, or `rotations=(0,)` to keep "
                                 "the images encoded.")
            store = "decoded"  # "auto" too: Omniglot decoded is small (32,460 images of 28x28 bytes per rotation)
        if split is not None:
            check_choice("split", split, SPLITS)
        if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
            raise ValueError(f"Expected `split_fractions` to be three non-negative shares summing to 1, got "
                             f"{tuple(split_fractions)}.")
        self._source = dict(root=root, subsets=list(subsets), alphabets=alphabets, size=_size(image_size),
                            rotations=tuple(rotations), split=split, split_fractions=split_fractions,
                            split_seed=split_seed, url=url if download else None, cache=cache,
                            decode_workers=decode_workers, store=store, decoded_limit=decoded_limit,
                            max_open_files=max_open_files)
        if not download:
            self.setup()

    download = staticmethod(download)

    def prepare_data(self) -> None:
        """Download the missing zips (``download=True``); called once, on one process, by the data module."""
        src = self.__dict__.get("_source")
        if src is not None and src["url"] is not None:
            for subset in src["subsets"]:
                download(src["root"], subset, src["url"])

    def __getattr__(self, name: str):
        # images, labels, class_names, files: read on first use when construction deferred them (download=True)
        source = self.__dict__.get("_source")
        if name in ("images", "labels", "class_names", "files") and source is not None:
            self.prepare_data()
            self.setup()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def class_groups(self) -> list[str]:
        """The alphabet of each class, in label order (the order of ``class_names``): the hierarchy that
        :class:`~lightning_meta.EpisodicDataModule` draws variable episodes within, one alphabet per episode, as
        Meta-Dataset does."""
        return [name.split("/", 1)[0] for name in self.class_names or ()]

    def setup(self) -> None:
        """Read the images (already done at construction unless ``download=True``)."""
        src = self.__dict__.pop("_source", None)
        if src is None:
            return
        images, labels, class_names, files, cache_file = _read(**{k: v for k, v in src.items() if k != "url"})
        CachedImageDataset.__init__(self, images, labels, class_names, cache_file)
        self.files = files


def _read(root: Path, subsets: Sequence[str], alphabets, size, rotations, split, split_fractions, split_seed, cache,
          decode_workers, store, decoded_limit, max_open_files):
    """The selected characters: ``(images uint8 [n, 1, S, S], labels [n], class names, file names, cache file)``."""
    characters: dict[str, list[tuple[str, str | tuple[str, str]]]] = {}
    for subset in subsets:
        for key, name, source in _list_subset(root, subset):
            characters.setdefault(key, []).append((name, source))
    if alphabets is not None:
        present = {k.split("/")[0] for k in characters}
        missing = [a for a in alphabets if a not in present]
        if missing:
            raise ValueError(
                f"Omniglot alphabet {missing[0]!r} is not in {list(subsets)}; available: {sorted(present)}."
            )
        characters = {k: v for k, v in characters.items() if k.split("/")[0] in set(alphabets)}
    keys = sorted(characters)
    if split is not None:
        keys = _split_keys(keys, split, split_fractions, split_seed)
    sources, labels, files = [], [], []
    for char_index, key in enumerate(keys):
        for name, source in sorted(characters[key], key=lambda item: item[0]):
            sources.append(source)
            labels.append(char_index)
            files.append(name)
    if not sources:
        raise ValueError(f"No Omniglot images were selected from {list(subsets)} in {root} (alphabets={alphabets}, "
                         f"split={split!r}).")
    n = len(sources)

    def rotate(images: np.ndarray) -> None:  # rows r*n .. (r+1)*n - 1: every character rotated by rotations[r]
        drawn = np.array(images[:n])
        for r, degrees in enumerate(rotations):
            images[r * n : (r + 1) * n] = np.rot90(drawn, k=degrees // 90, axes=(2, 3))

    images, cache_file = load_images("Omniglot", FileDecoder(sources, size, "L", invert=True), cache, decode_workers,
                                     rows=n * len(rotations), finish=rotate, options={"rotations": list(rotations)},
                                     store=store, decoded_limit=decoded_limit, max_open_files=max_open_files)
    base_labels = torch.tensor(labels)
    all_labels = torch.cat([base_labels * len(rotations) + r for r in range(len(rotations))])
    class_names = [f"{key}/rot{degrees}" for key in keys for degrees in rotations]
    return images, all_labels, class_names, files * len(rotations), cache_file


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split_keys(keys: list[str], split: str, fractions: Sequence[float], seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train = int(round(fractions[0] * len(keys)))
    n_val = int(round(fractions[1] * len(keys)))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(keys))}
    lo, hi = bounds[split]
    return sorted(keys[i] for i in order[lo:hi])


def _list_subset(root: Path, subset: str):
    """Yield ``(alphabet/character, file name, source)`` for every image of a subset, from its zip (whole: downloads
    are renamed into place when complete) or else its extracted folder; a source is a path or ``(zip, member)``."""
    folder, archive = root / subset, root / f"{subset}.zip"
    if folder.is_dir() and not archive.is_file():
        files = sorted(p for p in folder.glob("*/*/*") if p.is_file())
        if not files:
            raise ValueError(f"The Omniglot folder {folder} holds no <alphabet>/<character>/<image> files.")
        for path in files:
            yield f"{path.parent.parent.name}/{path.parent.name}", str(path), str(path)
        return
    if archive.is_file():
        try:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as err:
            raise ValueError(f"The Omniglot archive {archive} is not a valid zip file ({err}): delete it and download "
                             "it again.") from err
        members = sorted(n for n in names if not n.endswith("/") and n.count("/") == 3)
        for member in members:
            _, alphabet, character, _ = member.split("/")
            yield f"{alphabet}/{character}", f"{archive}:{member}", (str(archive), member)
        return
    raise ValueError(
        f"Omniglot subset {subset!r} not found: looked for the folder {folder} and the archive {archive}. Pass "
        f"`download=True` to fetch it, or point `root` at the folder that holds {subset}.zip."
    )
