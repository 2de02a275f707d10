"""Outside review of the decoded-image cache (#31): a build that meets a broken image stops at once."""

import contextlib
import multiprocessing
import sys
import warnings

import numpy as np
import pytest

from lightning_meta.data.datasets.cache import open_or_build


class CountingDecoder:
    """Image 0 is broken; every other image takes 2 ms and is counted in a counter shared with the decode workers."""

    def __init__(self):
        self.count = multiprocessing.get_context("fork").Value("i", 0)

    def __call__(self, i):
        if i == 0:
            raise ValueError("Cannot read the image file 0.png: broken. Remove or replace the corrupt file.")
        import time

        time.sleep(0.002)
        with self.count.get_lock():
            self.count.value += 1
        return np.zeros((2, 2, 1), dtype=np.uint8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked decode workers")
def test_a_broken_image_stops_the_parallel_build_without_decoding_the_rest(tmp_path):
    decode, n = CountingDecoder(), 4000
    with pytest.raises(ValueError, match=r"Cannot read the image file 0.png: broken. Remove or replace"):
        open_or_build(tmp_path, "Test", "k", (n, 1, 2, 2), decode, workers=2)
    # at most the chunks already queued (was n - 1: the pool decoded every other image before the error surfaced)
    assert decode.count.value < n // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, no temporary or lock file


def test_prune_cache_never_removes_the_lock_file_of_a_build_that_started_after_it_looked(tmp_path, monkeypatch):
    from lightning_meta.data import prune_cache
    from lightning_meta.data.datasets import cache

    lock = tmp_path / "ClassFolder-8x8-k.lmcache.lock"
    lock.touch()  # left by a killed build
    free = cache._lock_if_free

    @contextlib.contextmanager
    def then_a_build_starts(path):
        with free(path) as result:
            yield result
        lock.touch()  # a new build's lock file, taken as soon as prune let go of the old one

    monkeypatch.setattr(cache, "_lock_if_free", then_a_build_starts)
    assert prune_cache([], tmp_path) == [lock]
    assert lock.exists()  # was removed: a third process would then build beside the second


def test_a_timm_model_built_for_another_input_size_is_named_at_setup_with_its_own_argument():
    timm = pytest.importorskip("timm")  # noqa: F841 -- timm's ViT asserts its input size, it raises no RuntimeError
    import lightning as L
    import torch

    from lightning_meta import EpisodicDataModule, ProtoNet
    from lightning_meta.data import TensorClassDataset
    from lightning_meta.models import timm_backbone

    images = TensorClassDataset(torch.zeros(24, 3, 16, 16, dtype=torch.uint8), torch.arange(6).repeat_interleave(4))
    data = EpisodicDataModule(train=images, n_way=3, n_shot=1, n_query=1, meta_batch_size=1, train_episodes=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"ProtoNet's backbone VisionTransformer does not fit the train data: an input "
                                         r"of shape \(3, 16, 16\) fails in its forward \(Input height \(16\) doesn't "
                                         r"match model \(32\)\.\)\. Build it for this data: "
                                         r"timm_backbone\('vit_tiny_patch16_224', img_size=16\)"):
        trainer.fit(ProtoNet(timm_backbone("vit_tiny_patch16_224", img_size=32)), data)


def test_tiered_imagenet_folders_name_their_dangling_symlinks_as_class_folder_does(tmp_path):
    from PIL import Image

    from lightning_meta.data import TieredImageNet

    for c in ("n01", "n02"):
        (tmp_path / "test" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "test" / c / f"{i}.jpg")
    (tmp_path / "test" / "n02" / "gone.jpg").symlink_to(tmp_path / "imagenet" / "gone.jpg")  # a link into ImageNet
    with pytest.warns(UserWarning, match=r"TieredImageNet skips 1 dangling symlink under .*test \(their targets do not "
                                         r"exist\): .*n02/gone.jpg. Restore the targets, or remove the links"):
        ds = TieredImageNet(tmp_path, "test", image_size=8, cache=False)
    assert len(ds) == 4  # before: skipped without a word


def test_a_file_that_is_no_image_is_named_without_the_readers_in_memory_copy(tmp_path):
    from PIL import Image

    from lightning_meta.data import ClassFolder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / c / "0.png")
    (tmp_path / "a" / "1.jpg").write_bytes(b"<html>a download that failed</html>")
    with pytest.raises(ValueError, match=r"Cannot read the image file .*a/1.jpg: its content is in no image format PIL "
                                         r"reads. Remove or replace the corrupt file.$") as caught:
        ClassFolder(tmp_path, cache=False)
    assert "BytesIO" not in str(caught.value)  # before: "cannot identify image file <_io.BytesIO object at 0x...>"


def test_normalising_float_inputs_that_are_not_in_0_1_is_warned_at_setup_once():
    import lightning as L
    import torch

    from lightning_meta import EpisodicDataModule, ProtoNet
    from lightning_meta.data import TensorClassDataset
    from lightning_meta.models import MLP

    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    raw = torch.randint(0, 256, (24, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(6).repeat_interleave(4)
    normalised = (raw / 255 - 0.5) / 0.25  # a torchvision-style pipeline that normalised already

    def fit(x):
        data = EpisodicDataModule(train=TensorClassDataset(x, labels), n_way=3, n_shot=1, n_query=1, meta_batch_size=1,
                                  train_episodes=2)
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False).fit(ProtoNet(torch.nn.Sequential(torch.nn.Flatten(), MLP(48, (8,))),
                                                           normalize=stats), data)

    with pytest.warns(UserWarning, match=r"ProtoNet normalises its inputs with mean \[0.5, 0.5, 0.5\] and std "
                                         r"\[0.25, 0.25, 0.25\], which expects images in \[0, 1\], but the first train "
                                         r"input spans \[-\d.*\] \(already normalised\?\): pass `normalize=None`"):
        fit(normalised)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*normalises its inputs")
        fit(raw)  # uint8 images, and floats in [0, 1], are what it expects: no warning
        fit(raw / 255)
