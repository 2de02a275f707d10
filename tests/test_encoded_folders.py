"""The encoded store for the folder datasets (issue #30, item 2): ClassFolder, MiniImageNet, CUB, tieredImageNet's
image folders and Omniglot's zips keep their images' bytes in one pack and decode each item when drawn, with the same
pixels as the decoded store; the pack is built once, rebuilt when a file changes, survives pickling and DataLoader
workers, holds no list of paths in the dataset, and prune_cache keeps it while it is used."""

import gc
import io
import pickle
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FakeTrainer
from PIL import Image

from lightning_meta import EpisodicDataModule
from lightning_meta.data import CUB, ClassFolder, MiniImageNet, Omniglot, TieredImageNet, prune_cache


def image(seed: int, side: int = 12, mode: str = "RGB") -> Image.Image:
    """Random pixels (sides differ with the seed, so every item is resized)."""
    shape = (side + seed % 3, side + 1) + ((3,) if mode == "RGB" else ())
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def class_tree(root: Path, classes: int = 3, per_class: int = 4, suffix: str = ".png", mode: str = "RGB") -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            image(c * 100 + i, mode=mode).save(root / f"class{c}" / f"{i:02d}{suffix}", quality=90)
    return root


def both_stores(make):
    decoded, encoded = make("decoded"), make("encoded")
    assert (decoded.store, encoded.store) == ("decoded", "encoded")
    return decoded, encoded


def same_pixels(a, b) -> bool:
    every = torch.arange(len(a))
    return torch.equal(a.gather(every), b.gather(every)) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("suffix, mode", [(".jpg", "RGB"), (".png", "RGB"), (".png", "L"), (".jpg", "L")])
def test_an_encoded_class_folder_gives_the_decoded_pixels(tmp_path, suffix, mode):
    root = class_tree(tmp_path / "data", suffix=suffix, mode=mode)
    decoded, encoded = both_stores(lambda store: ClassFolder(root, image_size=8, mode=mode, cache=tmp_path / "cache",
                                                             store=store))
    assert same_pixels(decoded, encoded) and encoded.images.shape == decoded.images.shape
    assert encoded.gather(torch.tensor([5])).shape == (1, 1 if mode == "L" else 3, 8, 8)
    assert torch.equal(encoded[7][0], decoded[7][0]) and encoded[7][1] == decoded[7][1] == 1
    assert encoded.cache_file.path.suffix == ".lmindex" and encoded.cache_file.path.parent == tmp_path / "cache"
    assert encoded.images.open_files <= 1  # one pack, one descriptor, however many image files


def test_the_folder_benchmarks_offer_the_encoded_store_with_the_decoded_pixels(tmp_path):
    cache = tmp_path / "cache"
    mini = tmp_path / "mini"
    (mini / "images").mkdir(parents=True)
    rows = ["filename,label"]
    for i, wnid in enumerate(["n01", "n01", "n02", "n02", "n02"]):
        image(i).save(mini / "images" / f"{wnid}{i:04d}.jpg")
        rows.append(f"{wnid}{i:04d}.jpg,{wnid}")
    (mini / "val.csv").write_text("\n".join(rows))
    assert same_pixels(*both_stores(lambda s: MiniImageNet(mini, "val", image_size=8, cache=cache, store=s)))
    for c in ("001.Albatross", "002.Auklet", "003.Tern", "005.Crow"):
        (tmp_path / "cub" / "images" / c).mkdir(parents=True)
        for i in range(2):
            image(len(c) + i).save(tmp_path / "cub" / "images" / c / f"{i}.jpg")
    cub = both_stores(lambda s: CUB(tmp_path / "cub", "train", image_size=8, cache=cache, store=s))
    assert same_pixels(*cub) and cub[1].class_names == ["001.Albatross", "003.Tern", "005.Crow"]
    class_tree(tmp_path / "tiered" / "test", per_class=2)
    for order in ("rgb", "bgr"):  # the encoded store reverses the channels when it decodes, the decoded one in its cache
        tiered = both_stores(lambda s, order=order: TieredImageNet(tmp_path / "tiered", "test", image_size=8,
                                                                   cache=cache, store=s, channel_order=order))
        assert same_pixels(*tiered), order
    rgb, bgr = (TieredImageNet(tmp_path / "tiered", "test", image_size=8, cache=cache, store="encoded",
                               channel_order=order) for order in ("rgb", "bgr"))
    assert torch.equal(bgr.gather(torch.arange(6)), rgb.gather(torch.arange(6)).flip(1))
    assert bgr.cache_file.path == rgb.cache_file.path  # one pack of the files' bytes serves both orders


def omniglot_zip(root: Path) -> Path:
    """A tiny ``images_background_small1.zip`` in the authors' layout: <subset>/<alphabet>/<character>/<image>."""
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "images_background_small1.zip", "w") as zf:
        for a, alphabet in enumerate(("Greek", "Latin")):
            for c in range(2):
                for i in range(3):
                    buffer = io.BytesIO()
                    image(a * 10 + c * 3 + i, side=20, mode="L").save(buffer, "PNG")
                    zf.writestr(f"images_background_small1/{alphabet}/character0{c + 1}/{i}.png", buffer.getvalue())
    return root


def test_omniglot_keeps_its_zip_members_encoded_with_the_decoded_pixels_and_names_why_rotations_need_decoding(tmp_path):
    root, cache = omniglot_zip(tmp_path / "omniglot"), tmp_path / "cache"
    decoded, encoded = both_stores(lambda s: Omniglot(root, ["images_background_small1"], image_size=10, cache=cache,
                                                      store=s))
    assert same_pixels(decoded, encoded) and len(encoded) == 12
    assert decoded.gather(torch.arange(12)).float().mean() > 100  # inverted, as the decoded store inverts them
    with pytest.raises(ValueError, match=r"Omniglot: `rotations=\(0, 90\)` adds a rotated copy of every image, which "
                                         r"only the decoded store holds: pass `store='decoded'`, or `rotations=\(0,\)`"):
        Omniglot(root, ["images_background_small1"], rotations=(0, 90), cache=cache, store="encoded")
    auto = Omniglot(root, ["images_background_small1"], image_size=10, rotations=(0, 90), cache=cache, store="auto",
                    decoded_limit=0)  # rotations: "auto" decodes, however small the limit
    assert auto.store == "decoded" and len(auto) == 24


def test_the_pack_is_built_once_and_a_changed_file_gives_a_new_one(tmp_path):
    root, cache = class_tree(tmp_path / "data"), tmp_path / "cache"
    first = ClassFolder(root, image_size=8, cache=cache, store="encoded")
    again = ClassFolder(root, image_size=6, cache=cache, store="encoded")  # another size: the same files' bytes
    assert first.cache_file.built and not again.cache_file.built and again.cache_file.path == first.cache_file.path
    image(999).save(root / "class1" / "02.png")
    changed = ClassFolder(root, image_size=8, cache=cache, store="encoded")
    assert changed.cache_file.built and changed.cache_file.path != first.cache_file.path
    assert same_pixels(changed, ClassFolder(root, image_size=8, cache=cache))
    assert not torch.equal(changed.gather(torch.tensor([6])), first.gather(torch.tensor([6])))  # the new image
    assert torch.equal(changed.gather(torch.tensor([5])), first.gather(torch.tensor([5])))
    assert sorted(p.name for p in cache.glob("*.lmindex")) == sorted([first.cache_file.path.name,
                                                                      changed.cache_file.path.name])


def test_an_encoded_folder_pickles_as_its_pack_and_serves_dataloader_workers_the_same_episodes(tmp_path):
    root, cache = class_tree(tmp_path / "data", classes=5, per_class=5, suffix=".jpg"), tmp_path / "cache"
    decoded, encoded = both_stores(lambda s: ClassFolder(root, image_size=8, cache=cache, store=s))
    blob = pickle.dumps(encoded)
    assert not any(str(f).encode() in blob for f in decoded.files)  # no image paths travel to a worker
    assert len(blob) < 4096
    restored = pickle.loads(blob)
    assert restored.store == "encoded" and same_pixels(restored, decoded)

    def batches(ds, workers):
        dm = EpisodicDataModule(train=ds, val=None, n_way=3, n_shot=2, n_query=2, meta_batch_size=2,
                                train_episodes=6, val_episodes=2, seed=5, num_workers=workers)
        dm.setup("fit")
        dm.trainer = FakeTrainer(current_epoch=1)
        return list(dm.train_dataloader())

    expected, got = batches(decoded, 0), batches(encoded, 2)
    assert len(expected) == len(got) == 3
    for a, b in zip(expected, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_encoded_store_names_what_it_needs(tmp_path):
    root = class_tree(tmp_path / "data", per_class=2)
    with pytest.raises(ValueError, match=r"ClassFolder: `store='encoded'` needs `image_size` \(the encoded store "
                                         r"decodes items when they are drawn.*pass `image_size`, or `store='decoded'`"):
        ClassFolder(root, cache=tmp_path / "cache", store="encoded")
    with pytest.raises(ValueError, match=r"`store='encoded'` copies the images' bytes once into the cache folder, so it "
                                         r"needs `cache=True` or a folder; with `cache=False` use `store='decoded'`"):
        ClassFolder(root, image_size=8, cache=False, store="encoded")
    with pytest.raises(ValueError, match=r"ClassFolder: expected `store` to be one of 'auto', 'decoded', 'encoded', "
                                         r"but got 'packed'"):
        ClassFolder(root, image_size=8, store="packed")  # type: ignore[arg-type]
    np.savez(tmp_path / "test_images.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "test_labels.pkl").write_bytes(pickle.dumps({"labels": [448, 448, 449, 449]}))
    with pytest.raises(ValueError, match=r"TieredImageNet: the test split is read from test_images.npz \(arrays in a "
                                         r"pickle or an .npz file\), which only the decoded store holds: pass "
                                         r"`store='decoded'`, or use the image-folder layout"):
        TieredImageNet(tmp_path, "test", image_size=8, cache=False, store="encoded")
    assert TieredImageNet(tmp_path, "test", image_size=8, cache=False, store="auto").store == "decoded"


def test_store_auto_keeps_a_folder_encoded_when_its_decoded_size_is_over_the_limit(tmp_path):
    root, cache = class_tree(tmp_path / "data", per_class=2), tmp_path / "cache"
    size = 6 * 3 * 8 * 8
    over = ClassFolder(root, image_size=8, cache=cache, store="auto", decoded_limit=size - 1)  # (no decoded cache yet)
    assert over.store == "encoded"
    within = ClassFolder(root, image_size=8, cache=cache, store="auto", decoded_limit=size)
    assert within.store == "decoded" and within.cache_file.built and same_pixels(over, within)


def reachable_strings(obj) -> list[str]:
    """Every ``str`` reachable from ``obj`` through its containers and attributes (not through classes, modules or
    functions, which reach the whole program)."""
    seen, stack, found = set(), [obj], []
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, skip):
            continue
        seen.add(id(item))
        if isinstance(item, str):
            found.append(item)
        elif not isinstance(item, (bytes, int, float)):
            stack.extend(gc.get_referents(item))
    return found


def test_an_encoded_folder_holds_no_list_of_paths_and_reads_its_files_from_the_pack_when_asked(tmp_path):
    root, cache = class_tree(tmp_path / "data"), tmp_path / "cache"
    decoded, encoded = both_stores(lambda s: ClassFolder(root, image_size=8, cache=cache, store=s))
    paths = set(decoded.files)
    assert len(paths) == 12 and paths <= set(reachable_strings(decoded))  # the decoded store keeps its list
    assert not paths & set(reachable_strings(encoded))
    encoded.gather(torch.arange(12))
    assert not paths & set(reachable_strings(encoded))  # nor after reading items
    assert encoded.files == decoded.files  # read from the pack when asked
    assert not paths & set(reachable_strings(encoded))  # and not kept


def test_prune_cache_keeps_a_used_pack_and_removes_an_unused_one(tmp_path):
    root, cache = class_tree(tmp_path / "data", per_class=2), tmp_path / "cache"
    old = ClassFolder(root, image_size=8, cache=cache, store="encoded")
    old_pack = old.cache_file.path
    image(777).save(root / "class0" / "00.png")
    used = ClassFolder(root, image_size=8, cache=cache, store="encoded")
    assert old_pack.exists() and used.cache_file.path != old_pack
    assert prune_cache([used], cache, dry_run=True) == []  # `old` is alive: its pack is mapped
    del old
    gc.collect()
    assert prune_cache([used], cache) == [old_pack]
    assert not old_pack.exists() and used.cache_file.path.exists()
    assert same_pixels(used, ClassFolder(root, image_size=8, cache=cache))
