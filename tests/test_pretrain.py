"""Supervised pretraining (Pretrainer, EpisodicDataModule(pretrain_batch_size=...)), loading pretrained backbones,
and the channels_last throughput option."""

import lightning as L
import pytest
import torch
from helpers import FakeTrainer, assert_same_predictions, blob_data, blobs, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import toy_dataset
from lightning_meta import MAML, AttentionLearner, EpisodicDataModule, LabelledBatch, Pretrainer, ProtoNet
from lightning_meta.data import RandomAffine, Sinusoid, SyntheticGlyphs, TensorClassDataset
from lightning_meta.data.sampler import ClassBatchSampler
from lightning_meta.models import MLP, Conv4, load_pretrained


def pretrain_dm(**kw):
    args = dict(train=toy_dataset(names_prefix="tr"), val=toy_dataset(seed=1, names_prefix="va"), n_way=4, n_shot=2,
                n_query=3, val_episodes=10, seed=7, pretrain_batch_size=8)
    args.update(kw)
    return EpisodicDataModule(**args)


# ---------------------------------------------------------------------------------------------------- batches
def test_each_epoch_is_one_pass_over_the_dataset_in_an_order_fixed_by_seed_and_epoch():
    ds = toy_dataset()  # 12 classes x 8 items
    dm = pretrain_dm()
    dm.setup("fit")
    assert dm.steps_per_epoch() == 12 and dm.pretrain_classes == 12
    epochs = []
    for epoch in (0, 1):
        dm.trainer = FakeTrainer(current_epoch=epoch)
        batches = list(dm.train_dataloader())
        assert all(isinstance(b, LabelledBatch) and b.x.shape == (8, 6) for b in batches)
        x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
        # every item exactly once, with its own label
        order = torch.stack([torch.nonzero((ds.x == row).all(1)).squeeze() for row in x])
        assert sorted(order.tolist()) == list(range(96))
        assert torch.equal(y, ds.labels[order])
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])
    again = pretrain_dm()
    again.trainer = FakeTrainer(current_epoch=1)
    assert torch.equal(torch.cat([b.x for b in again.train_dataloader()]), ds.x[epochs[1]])
    other_seed = pretrain_dm(seed=8)
    other_seed.trainer = FakeTrainer(current_epoch=1)
    assert not torch.equal(torch.cat([b.x for b in other_seed.train_dataloader()]), ds.x[epochs[1]])


def test_labels_are_renumbered_from_zero_in_sorted_order():
    ds = TensorClassDataset(torch.randn(12, 2), torch.tensor([40, 7, 19]).repeat(4))
    sampler = ClassBatchSampler(ds, seed=0)
    batch = sampler.batch("train", 0, range(12))
    mapping = {7: 0, 19: 1, 40: 2}
    rows = [int(torch.nonzero((ds.x == r).all(1))) for r in batch.x]
    assert batch.y.tolist() == [mapping[int(ds.labels[i])] for i in rows]
    assert sampler.num_classes == 3


def test_ranks_take_distinct_batches_whose_union_is_the_single_process_batch():
    ranks = []
    for rank in range(2):
        dm = pretrain_dm(pretrain_batch_size=4)
        dm.trainer = FakeTrainer(world_size=2, global_rank=rank)
        ranks.append(list(dm.train_dataloader()))
    single = list(pretrain_dm(pretrain_batch_size=8).train_dataloader())
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 12
    for step, whole in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step].x, ranks[1][step].x]), whole.x)


def test_augmentation_applies_to_pretraining_batches_reproducibly_and_never_to_evaluation():
    images = SyntheticGlyphs(num_classes=6, samples_per_class=4, image_size=16, seed=0)
    val = SyntheticGlyphs(num_classes=4, samples_per_class=4, image_size=16, seed=1)

    def batches(transform):
        dm = pretrain_dm(train=images, val=val, n_way=2, n_shot=1, n_query=1, train_transform=transform)
        dm.trainer = FakeTrainer(current_epoch=0)
        return list(dm.train_dataloader()), list(dm.val_dataloader())

    (plain, plain_val), (aug, aug_val), (aug2, _) = batches(None), batches(RandomAffine(20)), batches(RandomAffine(20))
    assert all(torch.equal(a.y, b.y) for a, b in zip(plain, aug))
    assert all(not torch.equal(a.x, b.x) for a, b in zip(plain, aug))  # each batch distorted
    assert all(torch.equal(a.x, b.x) for a, b in zip(aug, aug2))  # and the same way every run
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(plain_val, aug_val))


def test_evaluation_episodes_do_not_change_with_pretraining_batches():
    dm, episodic = pretrain_dm(), pretrain_dm(pretrain_batch_size=None)
    pairs = list(zip(dm.val_dataloader(), episodic.val_dataloader()))
    assert len(pairs) == 10
    for a, b in pairs:
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def fit_pretrainer(directory, ckpt_path=None, max_steps=-1):
    L.seed_everything(0, verbose=False)
    images = SyntheticGlyphs(num_classes=6, samples_per_class=6, image_size=16, seed=0)
    model = Pretrainer(Conv4(hidden=8, image_size=16), lr=1e-2)
    saver = ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_last=True, save_top_k=0)
    fitter = L.Trainer(max_epochs=2, max_steps=max_steps, callbacks=[saver], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    dm = EpisodicDataModule(images, n_way=2, n_shot=1, n_query=1, pretrain_batch_size=6, seed=3,
                            train_transform=RandomAffine(degrees=20, translate=0.1))
    fitter.fit(model, dm, ckpt_path=ckpt_path)
    return model, fitter


def test_a_pretraining_run_resumed_mid_epoch_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    full, fitter = fit_pretrainer(tmp_path / "full")
    assert fitter.global_step == 12  # 2 epochs x 36 images / 6
    fit_pretrainer(tmp_path / "cut", max_steps=8)  # stops after step 2 of epoch 1
    resumed, _ = fit_pretrainer(tmp_path / "resumed", ckpt_path=tmp_path / "cut" / "last.ckpt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- the learner
def test_pretraining_learns_an_embedding_that_classifies_unseen_classes_by_prototype():
    L.seed_everything(0, verbose=False)
    train = SyntheticGlyphs(num_classes=30, samples_per_class=8, image_size=16, seed=0)
    unseen = SyntheticGlyphs(num_classes=10, samples_per_class=8, image_size=16, seed=2)
    dm = EpisodicDataModule(train, None, unseen, n_way=5, n_shot=1, n_query=3, test_episodes=40,
                            eval_meta_batch_size=8, pretrain_batch_size=30)  # no validation set: fit skips it
    model = Pretrainer(Conv4(hidden=16, image_size=16), lr=3e-3)
    untrained = trainer().test(model, dm, verbose=False)[0]["test/acc"]
    trainer(max_epochs=8).fit(model, dm)
    assert model.num_classes == 30 and model.hparams.num_classes == 30  # read from the data module
    evaluation = trainer()
    tested = evaluation.test(model, dm, verbose=False)[0]["test/acc"]
    assert tested > untrained + 0.15  # measured: 0.41 untrained, 0.63 after 8 epochs
    # the evaluation path is adapt(): the same logits task by task (argmaxes compared only away from near-ties), and
    # test/acc is the accuracy of the evaluation's logits
    hits = []
    for ep, logits in zip(dm.test_dataloader(), evaluation.predict(model, dm)):  # logits [B, M, N]
        tasks = [ep.task(t) for t in range(ep.num_tasks)]
        deployed = torch.stack([model.adapt(task.support_x, task.support_y)(task.query_x) for task in tasks])
        assert_same_predictions(deployed, logits, atol=1e-5, rtol=1e-5)
        hits.append((logits.argmax(-1) == ep.query_y).float().mean(-1))
    assert torch.cat(hits).mean().item() == pytest.approx(tested, abs=1e-6)


def test_the_checkpoint_loads_with_nothing_but_its_path_and_starts_a_protonet(tmp_path):
    model, _ = fit_pretrainer(tmp_path)
    ckpt = tmp_path / "last.ckpt"
    loaded = Pretrainer.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.num_classes == 6
    x = torch.rand(5, 1, 16, 16)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded.classify(x), model.classify(x))
    # a second run starts its backbone from the file: the same embedding, and a MAML head keeps its initialisation
    net = ProtoNet(Conv4(hidden=8, image_size=16, pretrained=str(ckpt))).eval()
    torch.testing.assert_close(net.embed(x), model.embed(x))
    torch.manual_seed(0)
    fresh_head = Conv4(hidden=8, image_size=16, out_features=3).head.weight
    torch.manual_seed(0)
    maml = MAML(Conv4(hidden=8, image_size=16, out_features=3, pretrained=str(ckpt)))
    assert torch.equal(maml.backbone.head.weight, fresh_head)
    assert torch.equal(maml.backbone.features[0][0].weight, model.backbone.features[0][0].weight)
    # and its own checkpoint rebuilds without the pretraining file
    assert "pretrained" not in maml.backbone.init_args
    # the two-fit script of the README: the pretrained module itself starts the episodic learner
    episodic = AttentionLearner(model.backbone, max_way=3)
    assert episodic.backbone is model.backbone


def test_the_two_cli_calls_of_the_readme_start_episodic_training_from_the_pretraining_checkpoint(tmp_path):
    from lightning_meta.cli import run

    glyphs = ["--data.train=lightning_meta.data.SyntheticGlyphs", "--data.train.num_classes=12",
              "--data.train.image_size=16", "--data.val=lightning_meta.data.SyntheticGlyphs",
              "--data.val.num_classes=6", "--data.val.image_size=16", "--data.val.seed=1", "--data.n_way=3",
              "--data.val_episodes=4", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"]
    backbone = ["--model.backbone=lightning_meta.models.Conv4", "--model.backbone.hidden=8",
                "--model.backbone.image_size=16"]
    pre = run(["fit", "--model=lightning_meta.Pretrainer", *backbone, "--data.pretrain_batch_size=16",
               "--trainer.max_steps=3", *glyphs])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    episodic = run(["validate", "--model=lightning_meta.ProtoNet", *backbone,
                    f"--model.backbone.pretrained={ckpt}", *glyphs])
    for a, b in zip(episodic.model.backbone.state_dict().values(), pre.model.backbone.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_pretraining_input_is_named(tmp_path):
    model = Pretrainer(MLP(6, (8,)), num_classes=12)
    with pytest.raises(TypeError, match=r"labelled batches \(x, y\).*pretrain_batch_size=128"):
        model.training_step(next(iter(blob_data().train_dataloader())), 0)
    with pytest.raises(ValueError, match=r"Labels must be 0..11 \(num_classes=12\), but this batch has labels from 0 "
                                         r"to 12"):
        model.training_step((torch.randn(3, 6), torch.tensor([0, 5, 12])), 0)
    with pytest.raises(TypeError, match="Labelled .* train a Pretrainer"):
        ProtoNet(MLP(6, (8,))).training_step(LabelledBatch(torch.randn(3, 6), torch.tensor([0, 1, 2])), 0)
    with pytest.raises(ValueError, match="The training dataset has 12 classes but Pretrainer\\(num_classes=5\\)"):
        trainer(max_steps=1).fit(Pretrainer(MLP(6, (8,)), num_classes=5), pretrain_dm())
    with pytest.raises(ValueError, match=r"reads the number of classes from an EpisodicDataModule\(pretrain_batch_size"):
        trainer(max_steps=1).fit(Pretrainer(MLP(8, (8,))), blob_data())
    lazy = Pretrainer(torch.nn.Linear(6, 4), num_classes=3)  # no stated width: one forward of the first input (#23)
    assert lazy.classify(torch.randn(2, 6)).shape == (2, 3) and lazy.hparams.feature_dim == 4
    with pytest.raises(ValueError, match="pretraining needs a labelled map-style dataset"):
        EpisodicDataModule(Sinusoid(), n_way=1, pretrain_batch_size=8).setup("fit")
    with pytest.raises(ValueError, match="`pretrain_batch_size`=200 x 1 processes = 200 examples a step, but the "
                                         "training dataset has 96"):
        pretrain_dm(pretrain_batch_size=200).setup("fit")


def test_a_pretrained_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in Conv4(hidden=8).state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r"features.0.0.weight \(8, 1, 3, 3\) in the file, \(16, 1, 3, 3\) here"):
        Conv4(hidden=16, pretrained=str(path))
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="shares no tensor with this Conv4"):
        load_pretrained(Conv4(), path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        Conv4(pretrained=str(tmp_path / "missing.ckpt"))


def test_blobs_helper_has_the_classes_the_tests_assume():
    assert blobs().labels.unique().numel() == 16


def test_pretraining_batches_do_not_depend_on_the_number_of_workers():
    def batches(workers):
        dm = pretrain_dm(num_workers=workers, train_transform=None)
        dm.trainer = FakeTrainer(current_epoch=1)
        return list(dm.train_dataloader())

    alone, pooled = batches(0), batches(2)
    assert len(alone) == len(pooled) == 12
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(alone, pooled))
