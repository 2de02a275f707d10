"""Any backbone (timm, torchvision, a plain module), ResNet-12 with DropBlock, and the heads fitted at test time."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import assert_same_predictions
from torch import nn

from lightning_meta import MAML, AttentionLearner, EpisodicDataModule, Pretrainer, ProtoNet
from lightning_meta.data import TensorClassDataset
from lightning_meta.functional.heads import fit_linear, fit_logistic, l2_normalize, linear_logits
from lightning_meta.models import DropBlock, ResNet12, embedding_width, timm_backbone, torchvision_backbone

timm = pytest.importorskip("timm")


def images(classes=8, per_class=6, side=32, seed=0, prefix="c"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (classes * per_class, 3, side, side), generator=g, dtype=torch.uint8)
    return TensorClassDataset(x, torch.arange(classes).repeat_interleave(per_class),
                              class_names=[f"{prefix}{i}" for i in range(classes)])


def data(pretrain=False):
    return EpisodicDataModule(train=images(), val=images(seed=1, prefix="v"), test=images(seed=2, prefix="t"),
                              n_way=3, n_shot=1, n_query=2, meta_batch_size=2, train_episodes=4, val_episodes=2,
                              test_episodes=2, pretrain_batch_size=8 if pretrain else None)


def fit_and_reload(learner, tmp_path, pretrain=False):
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=1)
    dm = data(pretrain)
    trainer.fit(learner, dm)
    path = tmp_path / "learner.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(learner).load_from_checkpoint(path)  # the backbone is rebuilt from the checkpoint alone
    batch = next(iter(dm.test_dataloader()))
    learner.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(batch), learner(batch), rtol=0, atol=1e-5)
    return loaded


BACKBONES = {
    "timm_backbone": lambda **kw: timm_backbone("resnet10t", **kw),
    "timm.create_model": lambda **kw: timm.create_model("resnet10t", **{"num_classes": 0, **kw}),
    "torchvision": lambda **kw: torchvision_backbone("resnet18", **kw),
}


@pytest.mark.parametrize("source", list(BACKBONES))
def test_a_timm_or_torchvision_backbone_trains_every_embedding_learner_and_reloads_from_its_checkpoint_alone(source,
                                                                                                          tmp_path):
    make = BACKBONES[source]
    assert embedding_width(make()) == 512
    torch.manual_seed(0)
    fit_and_reload(ProtoNet(make()), tmp_path)
    fit_and_reload(AttentionLearner(make(), max_way=5, dim=32), tmp_path)  # embedding_dim read from the model
    pre = fit_and_reload(Pretrainer(make()), tmp_path, pretrain=True)  # feature_dim and num_classes inferred
    assert pre.hparams.feature_dim == 512 and pre.num_classes == 8


@pytest.mark.parametrize("source", ["timm_backbone", "torchvision"])
def test_maml_adapts_a_timm_or_torchvision_network_and_reloads_it(source, tmp_path):
    torch.manual_seed(0)
    network = (timm_backbone("resnet10t", num_classes=3) if source == "timm_backbone" else
               torchvision_backbone("resnet18", features_only=False, num_classes=3))
    fit_and_reload(MAML(network, inner_lr=0.05, inner_steps=1, eval_inner_steps=1), tmp_path)


def test_a_plain_module_without_a_stated_width_gets_it_from_one_forward(tmp_path):
    body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten())  # 4 x 8 x 8 = 256, stated nowhere
    assert embedding_width(body) is None
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=1)
    pre = Pretrainer(body, classifier="cosine")  # Baseline++
    trainer.fit(pre, data(pretrain=True))
    assert pre.hparams.feature_dim == 256 and pre.classifier.weight.shape == (8, 256)
    attention = AttentionLearner(nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten()), max_way=5, dim=16)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=1)
    trainer.fit(attention, data())
    assert attention.input.in_features == 256 and attention.hparams.embedding_dim == 256
    with pytest.raises(ValueError, match=r"Pretrainer cannot tell the width of Sequential's embedding .* pass "
                                         r"`feature_dim=D`"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False).fit(
            Pretrainer(nn.Sequential(nn.Flatten()), num_classes=8), torch.utils.data.DataLoader([(torch.zeros(3), 0)]))


def test_second_order_maml_refuses_fused_attention_with_the_fix():
    vit = timm_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    with pytest.raises(ValueError, match=r"fused attention .* has no second derivative.* Use first_order=True, or "
                                         r"switch fused attention off"):
        MAML(vit, inner_lr=0.1, inner_steps=1)
    MAML(vit, inner_lr=0.1, inner_steps=1, first_order=True)  # first order: fine
    for m in vit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    MAML(vit, inner_lr=0.1, inner_steps=1)  # the fix the message gives


# ------------------------------------------------------------------------------------------------ ResNet-12
def test_dropblock_drops_its_rate_in_training_only_and_repeats_under_a_seed():
    drop = DropBlock(0.1, 5)
    x = torch.ones(16, 32, 64, 64)  # 2,097,152 activations
    torch.manual_seed(0)
    first = drop(x)
    rate = float((first == 0).float().mean())
    assert abs(rate - 0.1) < 0.003  # blocks of 25 correlate the draws: ~84k blocks, standard error ~0.001
    # at the border too: on 8x8 maps most activations lie within a block of the border (drawing centres only inside
    # the map dropped 7.4% with blocks of 5, 8.8% with blocks of 2)
    for size in (5, 2):
        small = DropBlock(0.1, size)(torch.ones(1024, 16, 8, 8))
        assert abs(float((small == 0).float().mean()) - 0.1) < 0.005, size
    torch.testing.assert_close(first.mean(), torch.tensor(1.0), atol=0, rtol=1e-5)  # rescaled to keep the mean
    torch.manual_seed(0)
    assert torch.equal(drop(x), first)
    assert torch.equal(drop.eval()(x), x)
    net = ResNet12(channels=(8, 16, 32, 64), drop_rate=0.1, dropblock_size=2)
    assert [type(b.out[-1]).__name__ for b in net.features[:4]] == ["Dropout", "Dropout", "DropBlock", "DropBlock"]
    assert net.embedding_dim == 64 and ResNet12().embedding_dim == 640
    z = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)
    a = net(z)
    torch.manual_seed(1)
    assert torch.equal(net(z), a)
    net.eval()
    assert torch.equal(net(z), net(z))
    with pytest.raises(ValueError, match=r"Expected `drop_rate` in \[0, 1\), but got 1.5"):
        ResNet12(drop_rate=1.5)


# ------------------------------------------------------------------------------------------------ heads
def test_the_logistic_head_agrees_with_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    labels = torch.arange(5).repeat_interleave(4)
    z = l2_normalize(centres[labels] + torch.randn(20, 16, generator=g) * 0.3)
    queries = l2_normalize(centres.repeat_interleave(3, 0) + torch.randn(15, 16, generator=g) * 0.3)
    ours = linear_logits(fit_logistic(z, labels, 5, c=1.0), queries).softmax(1)
    reference = sklearn.LogisticRegression(C=1.0, max_iter=1000, tol=1e-10).fit(z.numpy(), labels.numpy())
    expected = torch.from_numpy(reference.predict_proba(queries.numpy())).float()
    decided = assert_same_predictions(ours, expected, atol=1e-3)  # close, and the same class away from near-ties
    assert decided.all()  # no query is near a tie here (top-2 gaps over 0.1): every prediction is compared


def test_the_finetuned_head_with_zero_steps_is_the_untrained_head():
    z, y = torch.randn(6, 4), torch.arange(3).repeat_interleave(2)
    assert torch.equal(linear_logits(fit_linear(z, y, 3, steps=0), torch.randn(5, 4)), torch.zeros(5, 3))
    torch.manual_seed(0)
    model = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), head="finetune", head_steps=0)
    probabilities = model.adapt(torch.rand(6, 3, 2, 2), y)(torch.rand(4, 3, 2, 2)).softmax(1)
    assert torch.allclose(probabilities, torch.full((4, 3), 1 / 3))


@pytest.mark.parametrize("head,extra", [("prototype", {}), ("logistic", {}), ("finetune", {"head_steps": 20}),
                                        ("finetune", {"head_steps": 5, "finetune_backbone": True})])
@pytest.mark.parametrize("learner", [ProtoNet, Pretrainer])
def test_each_heads_evaluation_equals_adapt(learner, head, extra):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten())
    model = learner(body, head=head, **extra, **({"num_classes": 8, "feature_dim": 32} if learner is Pretrainer else {}))
    dm = data()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(model, dm, verbose=False)[0]
    batch = model.prepare_episode(next(iter(dm.test_dataloader())))
    (outputs,) = trainer.predict(model, dm)  # the evaluation path's logits [B, M, N], as the test loop computes them
    adapted = [model.adapt(batch.support_x[i], batch.support_y[i])(batch.query_x[i]) for i in range(batch.num_tasks)]
    assert_same_predictions(torch.stack(adapted), outputs, atol=1e-4)  # argmaxes compared away from near-ties only
    accuracy = np.mean([float((outputs[i].argmax(1) == batch.query_y[i]).float().mean()) for i in range(2)])
    assert result["test/acc"] == pytest.approx(accuracy, abs=1e-6)
