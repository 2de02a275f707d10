"""The decoded-image cache can be trusted (issue #31): a killed builder never hangs the next construction, the key
covers everything the pixels depend on (in order), a header is checked against the dataset, unreadable inputs are
named right, unused files can be pruned, and the cache says where it went."""

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.data import ClassFolder, HuggingFaceImages, MiniImageNet
from lightning_meta.data.datasets.cache import HEADER, MAGIC


def noise(size, seed):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def folder_of(root, classes=2, per_class=3, size=(8, 8), suffix="png"):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(noise(size, 10 * c + i)).save(root / f"c{c}" / f"{i}.{suffix}")
    return root


def children(pid):
    """Live (not zombie) processes whose parent is ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if entry.name.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid):
    with contextlib.suppress(OSError, IndexError):
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


# ------------------------------------------------------------------------------------------------ item 3
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_only_the_builders_main_process_leaves_no_worker_and_the_next_construction_completes(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    for c in range(4):  # 400 images that each take ~10 ms to decode (hard links of a few noisy 320x320 PNGs)
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(noise((320, 320), c)).save(root / f"c{c}" / "0.png")
        for i in range(1, 100):
            os.link(root / f"c{c}" / "0.png", root / f"c{c}" / f"{i}.png")
    fork = multiprocessing.get_context("fork")  # a forked process starts in milliseconds (no imports)
    builder = fork.Process(target=construct, args=(root, cache))  # the default decode_workers: a pool of every core
    builder.start()
    workers, again = [], None
    try:
        deadline = time.time() + 60
        while not workers and time.time() < deadline and builder.is_alive():
            workers = children(builder.pid) if list(cache.glob("*.tmp")) else []
            time.sleep(0.01)
        assert workers, "the builder never started its decode pool"
        time.sleep(0.05)
        workers = children(builder.pid)  # every worker of the pool by now
        os.kill(builder.pid, signal.SIGKILL)  # the main process only
        builder.join()
        assert not list(cache.glob("*.lmcache")), "killed too late: the build had finished"
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "the decode workers outlived their parent"
        again = fork.Process(target=construct, args=(root, cache))
        again.start()
        again.join(timeout=60)  # a hang fails here, after 60 s
        assert again.exitcode == 0, "the next construction did not complete"
        assert len(list(cache.glob("*.lmcache"))) == 1 and not list(cache.glob("*.tmp"))
        assert not list(cache.glob("*.lock"))  # item 18: no lock file left behind
    finally:
        for pid in [builder.pid, *workers, *(children(again.pid) + [again.pid] if again is not None else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # what the old code left behind


def construct(root, cache):
    ClassFolder(root, image_size=16, cache=cache)


# ------------------------------------------------------------------------------------------------ item 4
def mini_imagenet(root, rows):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        if not (root / "images" / name).exists():
            Image.fromarray(noise((10, 10), len(list((root / "images").iterdir())))).save(root / "images" / name)
    (root / "test.csv").write_text("\n".join(["filename,label"] + [f"{f},{c}" for f, c in rows]))
    return root


def test_reordered_csv_rows_serve_each_row_its_own_image(tmp_path):
    rows = [(f"n01{i}.png", "n01") for i in range(3)] + [(f"n03{i}.png", "n03") for i in range(3)]
    root = mini_imagenet(tmp_path / "mini", rows)
    first = MiniImageNet(root, "test", image_size=10, cache=tmp_path / "cache")
    mini_imagenet(root, rows[3:] + rows[:3])  # class n03's rows first
    again = MiniImageNet(root, "test", image_size=10, cache=tmp_path / "cache")
    assert again.cache_file.built and again.cache_file.path != first.cache_file.path
    assert torch.equal(again.images, MiniImageNet(root, "test", image_size=10, cache=False).images)
    assert torch.equal(again.images[again.labels == 0], first.images[first.labels == 0])


def test_a_csv_row_listed_twice_is_named(tmp_path):
    root = mini_imagenet(tmp_path / "mini", [("a.png", "n01"), ("b.png", "n01"), ("c.png", "n02"), ("a.png", "n01")])
    with pytest.raises(ValueError, match=rf"Line 5 of {root / 'test.csv'} lists a.png again \(first on line 2\): "
                                         r"each row is one image, remove the repeated row"):
        MiniImageNet(root, "test", image_size=10, cache=tmp_path / "cache")


def test_a_file_rewritten_to_the_same_size_and_modification_time_builds_a_new_cache(tmp_path):
    root = folder_of(tmp_path / "data", suffix="bmp")  # uncompressed: new pixels, same size
    before = ClassFolder(root, cache=tmp_path / "cache")
    target = root / "c1" / "2.bmp"
    stat = target.stat()
    time.sleep(0.05)  # past the coarse clock tick of the file's creation
    Image.fromarray(noise((8, 8), 99)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `touch -r`
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    after = ClassFolder(root, cache=tmp_path / "cache")
    assert after.cache_file.built and after.cache_file.path != before.cache_file.path
    assert torch.equal(after.images[-1], torch.from_numpy(noise((8, 8), 99)).permute(2, 0, 1))


def test_a_huggingface_image_column_of_file_paths_is_keyed_by_the_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = folder_of(tmp_path / "data")
    paths = sorted(str(p) for p in root.rglob("*.png"))
    hf = datasets.Dataset.from_dict({"image": paths, "label": [0, 0, 0, 1, 1, 1]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    before = HuggingFaceImages(hf, cache=tmp_path / "cache")
    Image.fromarray(noise((8, 8), 99)).save(paths[4])
    after = HuggingFaceImages(hf, cache=tmp_path / "cache")
    assert after.cache_file.built and after.cache_file.path != before.cache_file.path
    assert torch.equal(after.images[4], torch.from_numpy(noise((8, 8), 99)).permute(2, 0, 1))
    assert torch.equal(after.images[:4], before.images[:4])


# ------------------------------------------------------------------------------------------------ item 5
def rewrite_header(path, shape):
    head = path.read_bytes()[:HEADER]
    meta = json.loads(head[len(MAGIC):].split(b"\n", 1)[0])
    meta["shape"] = shape
    with open(path, "r+b") as f:
        f.write((MAGIC + json.dumps(meta).encode() + b"\n").ljust(HEADER, b"\0"))


@pytest.mark.parametrize(("shape", "message"), [
    ([18, 1, 8, 8], r"holds images of shape \[18, 1, 8, 8\], but the dataset has \[6, 3, 8, 8\]"),
    ([0, 3, 8, 8], r"holds images of shape \[0, 3, 8, 8\], but the dataset has \[6, 3, 8, 8\]"),
    ([-6, 3, 8, 8], r"has a damaged header: its shape \[-6, 3, 8, 8\] is not four sizes >= 0"),
    ([2 ** 62, 2 ** 62, 8, 8], r"holds images of shape \[4611686018427387904, 4611686018427387904, 8, 8\]"),
    ([6, 3, 8], r"has a damaged header: its shape \[6, 3, 8\] is not four sizes >= 0"),
])
def test_a_header_that_disagrees_with_the_dataset_is_named_with_the_fix(tmp_path, shape, message):
    root = folder_of(tmp_path / "data")
    path = ClassFolder(root, cache=tmp_path).cache_file.path
    rewrite_header(path, shape)
    if shape[0] == 0:
        os.truncate(path, HEADER)
    gc.collect()
    with pytest.raises(ValueError, match=rf"The image cache {path} {message}.* Delete {path}"):
        ClassFolder(root, cache=tmp_path)


# ------------------------------------------------------------------------------------------------ item 6
def test_a_png_named_jpg_is_decoded_by_its_content(tmp_path):
    root = folder_of(tmp_path / "data", suffix="png")
    os.rename(root / "c0" / "1.png", root / "c0" / "1.jpg")
    ds = ClassFolder(root, cache=tmp_path / "cache")
    assert torch.equal(ds.images[1], torch.from_numpy(noise((8, 8), 1)).permute(2, 0, 1))


def test_a_jpeg_the_fast_decoder_refuses_is_decoded_by_pil(tmp_path, monkeypatch):
    torchvision_io = pytest.importorskip("torchvision.io")
    root = folder_of(tmp_path / "data", suffix="jpg")

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported JPEG process")

    monkeypatch.setattr(torchvision_io, "decode_jpeg", refuse)
    ds = ClassFolder(root, cache=False)
    with Image.open(root / "c1" / "2.jpg") as img:
        assert torch.equal(ds.images[5], torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))


@pytest.fixture
def read_only(tmp_path):
    """Make a folder unwritable: permissions, or the immutable attribute where permissions do not bind (root)."""
    made = []

    def make(folder):
        folder.chmod(0o555)
        made.append(folder)
        with contextlib.suppress(OSError):
            (folder / ".probe").touch()
            (folder / ".probe").unlink()
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("cannot make a folder read-only here")
        return folder

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_a_read_only_cache_folder_is_named_with_the_fix_and_serves_a_cache_it_holds(tmp_path, read_only):
    root = folder_of(tmp_path / "data")
    built = ClassFolder(root, cache=tmp_path / "full")
    read_only(tmp_path / "full")
    again = ClassFolder(root, cache=tmp_path / "full")  # a shared read-only cache still serves its files
    assert not again.cache_file.built and torch.equal(again.images, built.images)
    (tmp_path / "empty").mkdir()
    empty = read_only(tmp_path / "empty")
    with pytest.raises(ValueError, match=rf"Cannot write to the image cache folder {empty} \(.*\): pass `cache=` a "
                                         r"writable folder \(or set \$LIGHTNING_META_CACHE\), or `cache=False`"):
        ClassFolder(root, cache=empty)


def test_dangling_symlinks_in_a_class_folder_are_skipped_with_one_warning_naming_them(tmp_path):
    root = folder_of(tmp_path / "data")
    for c in ("c0", "c1"):
        (root / c / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.warns(UserWarning, match=r"ClassFolder skips 2 dangling symlinks under .*data \(their targets do not "
                                         r"exist\): .*c0/gone.png, .*c1/gone.png") as caught:
        ds = ClassFolder(root, cache=tmp_path / "cache")
    assert len([w for w in caught if "dangling" in str(w.message)]) == 1
    assert len(ds) == 6


# ------------------------------------------------------------------------------------------------ item 7
def test_prune_cache_removes_the_files_no_kept_or_living_dataset_uses(tmp_path):
    from lightning_meta.data import prune_cache

    cache, root = tmp_path / "cache", folder_of(tmp_path / "data")
    old = ClassFolder(root, cache=cache).cache_file.path  # its dataset is gone: the file is unused
    gc.collect()
    Image.fromarray(noise((8, 8), 99)).save(root / "c0" / "0.png")
    current = ClassFolder(root, cache=cache)
    other = ClassFolder(root, image_size=4, cache=cache)  # alive in this process, not kept: still in use
    killed = cache / f"{current.cache_file.path.name}.999999.tmp"  # a killed build's temporary file
    killed.write_bytes(b"partial")
    (cache / "notes.txt").write_text("not ours")
    planned = prune_cache([current], cache, dry_run=True)
    assert sorted(planned) == sorted([old, killed]) and old.exists() and killed.exists()
    assert sorted(prune_cache(current, cache)) == sorted(planned)
    assert not old.exists() and not killed.exists()
    assert current.cache_file.path.exists() and other.cache_file.path.exists() and (cache / "notes.txt").exists()
    assert torch.equal(ClassFolder(root, cache=cache).images, current.images)
    with pytest.raises(TypeError, match=r"Expected `keep` to hold datasets, cache files or paths, but got int"):
        prune_cache([3], cache)
    with pytest.raises(TypeError, match=r"Expected `keep` to hold datasets, cache files or paths, but got int"):
        prune_cache(3, cache)


# ------------------------------------------------------------------------------------------------ item 18
def test_the_cache_logs_its_path_once_when_building_and_leaves_no_lock_file(tmp_path, caplog):
    root = folder_of(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="lightning_meta"):
        path = ClassFolder(root, cache=tmp_path).cache_file.path
        ClassFolder(root, cache=tmp_path)
    logged = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("ClassFolder: decoding 6 images once into ")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", path.name])
