"""learn2learn task datasets feed EpisodicDataModule and our learners."""

import sys

import pytest
import torch
from helpers import blobs, trainer

from conftest import require_learn2learn
from lightning_meta import EpisodicDataModule, ProtoNet
from lightning_meta.data import learn2learn_tasksets
from lightning_meta.models import MLP


def taskset(l2l, seed, ways=3, shots=5):
    meta = l2l.data.MetaDataset(blobs(seed=seed))
    return l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, ways), l2l.data.transforms.KShots(meta, shots),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta)], num_tasks=-1)


def test_a_learn2learn_taskdataset_trains_and_evaluates_a_protonet():
    l2l = require_learn2learn()
    dm = EpisodicDataModule(train=taskset(l2l, 0), val=taskset(l2l, 1), test=taskset(l2l, 2), n_way=3, n_shot=2,
                            n_query=3, meta_batch_size=2, train_episodes=20, val_episodes=6, test_episodes=6)
    model = ProtoNet(MLP(8, (16,)), lr=3e-3)
    t = trainer(max_epochs=2)
    t.fit(model, dm)
    assert t.test(model, dm, verbose=False)[0]["test/acc"] > 0.6
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 6, 8) and batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]


def test_learn2learn_episodes_are_reproducible_and_leave_the_global_random_state_alone():
    l2l = require_learn2learn()
    import random

    dm = EpisodicDataModule(val=taskset(l2l, 1), n_way=3, n_shot=2, n_query=3, val_episodes=4)
    random.seed(123)
    before = random.random()
    random.seed(123)
    a = [b.support_x for b in dm.val_dataloader()]
    assert random.random() == before
    b = [b.support_x for b in dm.val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_mismatched_learn2learn_taskset_is_named():
    l2l = require_learn2learn()
    dm = EpisodicDataModule(val=taskset(l2l, 1, ways=4), n_way=3, n_shot=2, n_query=3, val_episodes=2)
    with pytest.raises(ValueError, match=r"gave a task of 4 classes .* build it with NWays\(3\) and KShots\(5\)"):
        next(iter(dm.val_dataloader()))


def test_missing_learn2learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)
    monkeypatch.setitem(sys.modules, "learn2learn.vision", None)
    monkeypatch.setitem(sys.modules, "learn2learn.vision.benchmarks", None)
    with pytest.raises(ImportError, match="--no-build-isolation -C--global-option=build_ext learn2learn==0.2.0"):
        learn2learn_tasksets("omniglot", root="/nowhere")
