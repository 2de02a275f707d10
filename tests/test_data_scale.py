"""Data at benchmark scale: the decoded-image cache, uint8 episodes, the benchmark formats, named evaluation sets and
Hugging Face sources."""

import json
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import OMNIGLOT, needs_omniglot
from lightning_meta import MAML, EpisodicDataModule, ProtoNet
from lightning_meta.data import (
    CIFARFS,
    CUB,
    FC100,
    ClassFolder,
    HuggingFaceImages,
    Omniglot,
    TensorClassDataset,
)
from lightning_meta.data.datasets.benchmarks import CIFARFS_SPLITS, FC100_SUPERCLASSES
from lightning_meta.models import MLP, Conv4


def image_folder(root, classes=4, per_class=6, size=(20, 16), suffix="jpg", seed=0, prefix="class"):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"{prefix}{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{suffix}")
    return root


def construct(root, cache, image_size, report=None):
    """A ClassFolder built in a process of its own (forked: it starts in milliseconds, with the imports done), in a
    session of its own; what it built into the file ``report``."""
    os.setsid()
    torch.set_num_threads(1)  # the parent's OpenMP threads are not in a forked child: a parallel torch op would hang
    ds = ClassFolder(root, image_size=image_size, cache=cache, decode_workers=1)
    if report is not None:
        Path(report).write_text(json.dumps({"built": ds.cache_file.built, "sum": int(ds.images.long().sum()),
                                            "path": str(ds.cache_file.path)}))


def constructing(root, cache, image_size, report=None):
    process = multiprocessing.get_context("fork").Process(target=construct, args=(root, cache, image_size, report))
    process.start()
    return process


# ------------------------------------------------------------------------------------------------ the cache
@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_cached_images_equal_the_uncached_decode_exactly_and_a_second_construction_maps_the_same_file(tmp_path, suffix):
    root = image_folder(tmp_path / "data", suffix=suffix)
    first = ClassFolder(root, image_size=12, cache=tmp_path / "cache")
    again = ClassFolder(root, image_size=12, cache=tmp_path / "cache")
    plain = ClassFolder(root, image_size=12, cache=False)
    assert first.cache_file.built and not again.cache_file.built and first.cache_file.path == again.cache_file.path
    assert plain.cache_file is None and first.images.dtype == torch.uint8
    assert torch.equal(first.images, plain.images) and torch.equal(again.images, plain.images)
    assert torch.equal(first.labels, plain.labels)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()].count(".lmcache") == 1


@needs_omniglot
def test_omniglot_rotations_from_the_cache_equal_the_uncached_decode(tmp_path):
    args = dict(root=OMNIGLOT, subsets=["images_background_small1"], alphabets=["Greek"], rotations=(0, 90, 270))
    cached, plain = Omniglot(**args, cache=tmp_path), Omniglot(**args, cache=False)
    assert cached.cache_file.built and torch.equal(cached.images, plain.images)
    first, turned = cached.images[cached.labels == 0][0], cached.images[cached.labels == 1][0]
    assert torch.equal(turned, torch.rot90(first, 1, (1, 2)))


def test_a_changed_source_or_image_size_builds_another_cache(tmp_path):
    root = image_folder(tmp_path / "data", suffix="png")
    before = ClassFolder(root, image_size=12, cache=tmp_path / "cache")
    resized = ClassFolder(root, image_size=10, cache=tmp_path / "cache")
    assert resized.cache_file.built and resized.cache_file.path != before.cache_file.path
    Image.new("RGB", (20, 16), (255, 0, 0)).save(root / "class0" / "0.png")  # same name, new content
    changed = ClassFolder(root, image_size=12, cache=tmp_path / "cache")
    assert changed.cache_file.built and changed.cache_file.path != before.cache_file.path
    assert torch.equal(changed.images, ClassFolder(root, image_size=12, cache=False).images)
    assert not torch.equal(changed.images[0], before.images[0])


def test_a_truncated_or_foreign_cache_file_is_named_with_the_fix(tmp_path):
    root = image_folder(tmp_path / "data", suffix="png")
    path = ClassFolder(root, image_size=12, cache=tmp_path).cache_file.path
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(ValueError, match=rf"The image cache {path} is truncated or damaged: .* Delete {path}"):
        ClassFolder(root, image_size=12, cache=tmp_path)
    path.write_bytes(b"PK\x03\x04 something else" * 10)
    with pytest.raises(ValueError, match=rf"{path} is not a lightning-meta image cache .* Delete {path}"):
        ClassFolder(root, image_size=12, cache=tmp_path)
    path.unlink()
    assert ClassFolder(root, image_size=12, cache=tmp_path).cache_file.built  # deleting it is the fix


def test_an_unwritable_cache_folder_is_named_with_the_fix(tmp_path):
    root = image_folder(tmp_path / "data", classes=2, per_class=2, suffix="png")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"Cannot create the image cache folder {blocker / 'sub'} .*: pass `cache=` a "
                                         r"writable folder \(or set \$LIGHTNING_META_CACHE\), or `cache=False`"):
        ClassFolder(root, cache=blocker / "sub")


def test_two_processes_constructing_at_once_build_one_cache_and_read_equal_images(tmp_path):
    root = image_folder(tmp_path / "data", classes=6, per_class=60, size=(64, 64), suffix="png")
    procs = [constructing(root, tmp_path / "cache", 32, tmp_path / f"built{i}.json") for i in range(2)]
    try:
        for p in procs:
            p.join(timeout=300)
            assert p.exitcode == 0
    finally:
        for p in procs:
            p.kill()  # (one still running after a failure)
    results = [json.loads((tmp_path / f"built{i}.json").read_text()) for i in range(2)]
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["sum"] == results[1]["sum"] == int(ClassFolder(root, image_size=32, cache=False).images.long().sum())
    assert results[0]["path"] == results[1]["path"]
    assert len(list((tmp_path / "cache").glob("*.lmcache"))) == 1 and not list((tmp_path / "cache").glob("*.tmp"))


def test_a_build_killed_midway_leaves_no_readable_cache_and_the_next_construction_rebuilds(tmp_path):
    root = image_folder(tmp_path / "data", classes=4, per_class=300, size=(160, 160), suffix="png")
    cache = tmp_path / "cache"
    proc = constructing(root, cache, 24)
    deadline = time.time() + 120
    while not list(cache.glob("*.tmp")) and time.time() < deadline and proc.is_alive():
        time.sleep(0.01)
    if not list(cache.glob("*.tmp")):
        proc.kill()
        pytest.fail("the build never started")
    time.sleep(0.2)  # midway through the decode
    os.killpg(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL  # killed, not finished
    assert not list(cache.glob("*.lmcache"))  # nothing that reads as a cache
    rebuilt = ClassFolder(root, image_size=24, cache=cache)
    assert rebuilt.cache_file.built and not list(cache.glob("*.tmp"))  # the killed build's file was cleared
    assert torch.equal(rebuilt.images, ClassFolder(root, image_size=24, cache=False).images)


def test_a_cached_dataset_pickles_as_its_file_and_unpickles_to_the_same_images(tmp_path):
    ds = ClassFolder(image_folder(tmp_path / "data", per_class=20, size=(32, 32), suffix="png"), image_size=32,
                     cache=tmp_path)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.images.numel() / 10  # the images are not in it
    back = pickle.loads(blob)
    assert torch.equal(back.images, ds.images) and back.cache_file.path == ds.cache_file.path


def test_parallel_decode_fills_the_cache_like_one_process(tmp_path):
    root = image_folder(tmp_path / "data", classes=5, per_class=80, size=(24, 24), suffix="jpg")
    parallel = ClassFolder(root, image_size=16, cache=tmp_path / "a", decode_workers=2)
    serial = ClassFolder(root, image_size=16, cache=tmp_path / "b", decode_workers=1)
    assert torch.equal(parallel.images, serial.images)


# ------------------------------------------------------------------------------------------------ uint8 episodes
@pytest.mark.parametrize("learner", ["protonet", "maml"])
def test_uint8_episodes_converted_on_the_device_give_the_logits_of_float_episodes(learner):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8 * 6, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(8).repeat_interleave(6)
    data = [EpisodicDataModule(test=TensorClassDataset(x, labels), n_way=3, n_shot=2, n_query=2, meta_batch_size=2,
                               test_episodes=4) for x in (images, images.float() / 255)]
    u8, f32 = (next(iter(d.test_dataloader())) for d in data)
    assert u8.support_x.dtype == torch.uint8 and f32.support_x.dtype == torch.float32
    assert u8.support_x.element_size() * 4 == f32.support_x.element_size()
    torch.manual_seed(0)
    model = (ProtoNet(Conv4(hidden=8)) if learner == "protonet" else
             MAML(Conv4(hidden=8, out_features=3), inner_lr=0.1, inner_steps=1, eval_inner_steps=2))
    model.eval()
    torch.testing.assert_close(model(u8), model(f32), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ benchmark formats
def test_cub_keeps_the_classes_of_chen_et_al_split(tmp_path):
    names = [f"{i:03d}.Bird_{i}" for i in range(1, 9)]
    for n in names:
        image_folder(tmp_path / "CUB_200_2011" / "images", classes=1, per_class=3, size=(40, 30), prefix=n)
    for folder in (tmp_path / "CUB_200_2011" / "images").iterdir():
        folder.rename(folder.with_name(folder.name[:-1]))  # image_folder appended the class index
    splits = {s: CUB(tmp_path / "CUB_200_2011", s, image_size=16, cache=tmp_path / "c").class_names
              for s in ("train", "val", "test")}
    assert splits == {"train": names[0::2], "val": [names[1], names[5]], "test": [names[3], names[7]]}
    train = CUB(tmp_path / "CUB_200_2011", "train", image_size=16, cache=False)
    assert train.images.shape == (12, 3, 16, 16)
    assert torch.equal(train.images, ClassFolder(tmp_path / "CUB_200_2011" / "images", 16, classes=names[0::2],
                                                 cache=False).images)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    """CIFAR-100's python pickles in their real format: 100 classes, 3 images each (2 in train, 1 in test)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    root.mkdir()
    names = sorted(n for split in CIFARFS_SPLITS.values() for n in split)
    rng = np.random.default_rng(0)
    for part, per_class in (("train", 2), ("test", 1)):
        fine = np.repeat(np.arange(100), per_class)
        data = {"data": rng.integers(0, 255, (len(fine), 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist()}
        (root / part).write_bytes(pickle.dumps(data))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": [str(i) for i in range(20)]}))
    return root


def test_cifar_fs_and_fc100_split_cifar100_as_published(cifar100, tmp_path):
    sizes = {}
    for split in ("train", "val", "test"):
        fs = CIFARFS(cifar100, split, cache=tmp_path)
        assert fs.class_names == CIFARFS_SPLITS[split] and len(fs) == 3 * len(fs.class_names)
        fc = FC100(cifar100, split, cache=tmp_path)
        sizes[split] = (fs.num_classes, fc.num_classes)
        names = sorted(n for s in CIFARFS_SPLITS.values() for n in s)
        assert {names.index(n) // 5 for n in fc.class_names} == set(FC100_SUPERCLASSES[split])
    assert sizes == {"train": (64, 60), "val": (16, 20), "test": (20, 20)}
    train = pickle.loads((cifar100 / "train").read_bytes())
    apple = CIFARFS(cifar100, "train", cache=False)
    first = apple.images[apple.labels == CIFARFS_SPLITS["train"].index("apple")][0]  # "apple" is class 0 of CIFAR-100
    assert torch.equal(first, torch.from_numpy(train["data"][0].reshape(3, 32, 32)))
    assert CIFARFS(cifar100, "val", image_size=16, cache=False).images.shape[1:] == (3, 16, 16)


# ------------------------------------------------------------------------------------------------ named test sets
def _toy(seed, classes=10, prefix="c"):
    g = torch.Generator().manual_seed(seed)
    return TensorClassDataset(torch.randn(classes * 8, 6, generator=g), torch.arange(classes).repeat_interleave(8),
                              class_names=[f"{prefix}{i}" for i in range(classes)])


def test_named_test_sets_log_per_set_metrics_equal_to_separate_runs():
    sets = {"near": _toy(1, prefix="n"), "far": _toy(2, prefix="f")}
    torch.manual_seed(0)
    model = ProtoNet(MLP(6, hidden=(16,), out_features=8))
    args = dict(n_way=3, n_shot=2, n_query=3, meta_batch_size=2, test_episodes=10)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    together = trainer.test(model, EpisodicDataModule(test=sets, **args), verbose=False)
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    for name, ds in sets.items():
        alone = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        alone.test(model, EpisodicDataModule(test=ds, **args), verbose=False)
        for metric in ("acc", "acc_ci95", "loss"):
            assert logged[f"test/{name}/{metric}"] == pytest.approx(float(alone.logged_metrics[f"test/{metric}"]), abs=1e-6)
    assert logged["test/acc"] == pytest.approx((logged["test/near/acc"] + logged["test/far/acc"]) / 2) and len(together) == 2


def test_named_validation_sets_are_logged_by_name_during_fit_and_share_no_class_with_training():
    model = ProtoNet(MLP(6, hidden=(16,), out_features=8))
    data = EpisodicDataModule(train=_toy(0, prefix="t"), val={"a": _toy(1, prefix="a"), "b": _toy(2, prefix="b")},
                              n_way=3, n_shot=2, n_query=3, meta_batch_size=2, train_episodes=4, val_episodes=4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    assert {"val/a/acc", "val/a/acc_ci95", "val/b/acc", "val/b/loss"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match=r"The train and val/b datasets share 10 classes"):
        EpisodicDataModule(train=_toy(0, prefix="t"), val={"a": _toy(1, prefix="a"), "b": _toy(2, prefix="t")},
                           n_way=3).setup("fit")
    with pytest.raises(ValueError, match=r"Expected `test` as a dict to map set names \(non-empty strings\)"):
        EpisodicDataModule(test={})


# ------------------------------------------------------------------------------------------------ Hugging Face
def test_a_huggingface_dataset_gives_the_episodes_of_the_same_images_in_a_tensor_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 10, 10), generator=g, dtype=torch.uint8)
    labels = torch.arange(5).repeat_interleave(8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcde"))})
    hf = datasets.Dataset.from_dict({"image": [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images],
                                     "label": labels.tolist()}, features=features)
    args = dict(n_way=3, n_shot=2, n_query=2, meta_batch_size=2, test_episodes=6)
    ours = EpisodicDataModule(test=hf, **args)
    assert isinstance(ours.test, HuggingFaceImages) and ours.test.class_names == list("abcde")
    reference = EpisodicDataModule(test=TensorClassDataset(images, labels), **args)
    for a, b in zip(ours.test_dataloader(), reference.test_dataloader()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(HuggingFaceImages(hf, cache=tmp_path).images, images)
    with pytest.raises(TypeError, match=r"Got a Hugging Face DatasetDict with the splits \['train'\]: pass one split"):
        EpisodicDataModule(test=datasets.DatasetDict({"train": hf}))
    with pytest.raises(ValueError, match=r"`label_column`='fine' is not a column of the dataset; its columns are"):
        HuggingFaceImages(hf, label_column="fine")
