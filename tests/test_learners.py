import pytest
import torch
from helpers import blob_data, episode, trainer

from lightning_meta import MAML, AttentionLearner, Episode, EpisodeAccuracy, EpisodicDataModule, ProtoNet
from lightning_meta.functional import class_prototypes
from lightning_meta.metrics import EpisodeMean
from lightning_meta.models import MLP, Conv4, ResNet12


def test_protonet_logits_are_negative_squared_distances_to_class_means():
    net = ProtoNet(torch.nn.Identity())
    ep = episode(b=1, n=3, k=2, q=2, dim=4)
    logits = net(ep)
    protos = ep.support_x[0].view(3, 2, 4).mean(1)
    expected = -((ep.query_x[0][:, None] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits[0], expected)


def test_protonet_cosine_uses_a_learnable_scale():
    net = ProtoNet(torch.nn.Identity(), distance="cosine", scale=5.0)
    ep = episode(b=1)
    logits = net(ep)
    assert logits.abs().max() <= 5.0 + 1e-5 and net.scale.requires_grad
    with pytest.raises(ValueError, match=r"Expected `distance` to be one of \('euclidean', 'cosine'\), but got 'l1'"):
        ProtoNet(torch.nn.Identity(), distance="l1")


def test_prototypes_are_class_means_in_any_label_order():
    emb = torch.tensor([[1.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(class_prototypes(emb, torch.tensor([0, 1, 0, 1]), 2), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))


def test_protonet_learns_blobs_in_a_plain_trainer_and_logs_the_contract_names():
    model = ProtoNet(MLP(8, (32,)), lr=3e-3)
    t = trainer(max_epochs=3)
    dm = blob_data(train_episodes=40, val_episodes=20)
    t.fit(model, dm)
    assert {"val/acc", "val/acc_ci95", "val/loss", "train/loss", "train/acc"} <= set(t.logged_metrics)
    res = t.test(model, dm, verbose=False)[0]
    assert {"test/acc", "test/acc_ci95", "test/loss"} <= set(res)
    assert res["test/acc"] > 0.8 and 0 <= res["test/acc_ci95"] < 0.3


def test_adapt_returns_a_predictor_for_one_new_task():
    model = ProtoNet(MLP(8, (16,)))
    ep = episode(b=1)
    predictor = model.adapt(ep.support_x[0], ep.support_y[0])
    model.eval()
    torch.testing.assert_close(predictor(ep.query_x[0]), model(ep)[0])
    assert predictor.n_way == 3
    with pytest.raises(ValueError, match="without a batch dimension"):
        model.adapt(ep.support_x, ep.support_y)


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    model = ProtoNet(Conv4(hidden=8), lr=1e-3)
    dm = EpisodicDataModule(train=_images(0), val=_images(1), n_way=3, n_shot=1, n_query=2, meta_batch_size=2,
                  train_episodes=4, val_episodes=2)
    t = trainer(max_epochs=1, default_root_dir=tmp_path)
    t.fit(model, dm)
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = ProtoNet.load_from_checkpoint(path, backbone=Conv4(hidden=8))
    batch = next(iter(dm.val_dataloader()))
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(batch), loaded(batch))


def _images(seed):
    from lightning_meta.data import TensorClassDataset

    g = torch.Generator().manual_seed(seed)
    return TensorClassDataset(torch.rand(24, 1, 28, 28, generator=g), torch.arange(6).repeat_interleave(4),
                              [f"img{seed}-{i}" for i in range(6)])


def test_bf16_mixed_precision_trains_every_learner_on_cpu():
    for model in (ProtoNet(MLP(8, (16,))), MAML(MLP(8, (16,), 3), inner_lr=0.1),
                  AttentionLearner(MLP(8, (16,)), max_way=5, dim=16, heads=2)):
        t = trainer(precision="bf16-mixed", limit_val_batches=2)
        t.fit(model, blob_data())
        assert torch.isfinite(t.logged_metrics["train/loss"]) and "val/acc" in t.logged_metrics


def test_float16_mixed_precision_on_cpu_is_replaced_by_bf16_with_a_clear_warning():
    # Lightning refuses fp16 AMP on CPU with a warning naming the switch; the run then trains in bf16
    with pytest.warns(UserWarning, match=r"AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        t = trainer(precision="16-mixed", limit_val_batches=2)
    t.fit(ProtoNet(MLP(8, (16,))), blob_data())
    assert t.precision == "bf16-mixed" and torch.isfinite(t.logged_metrics["train/loss"])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda e: Episode(e.support_x, e.support_y, e.query_x, e.query_y + 5),
         r"query label \(7\) is outside the support labels 0..2"),
        (lambda e: Episode(e.support_x[:, :0], e.support_y[:, :0], e.query_x, e.query_y), "support set is empty"),
        (lambda e: Episode(e.support_x, e.support_y - 1, e.query_x, e.query_y), "labels must be 0..N-1, but found label -1"),
        (lambda e: Episode(e.support_x[0], e.support_y[0], e.query_x[0], e.query_y[0]), r"with a meta-batch dimension"),
        (lambda e: Episode(e.support_x[:, :5], e.support_y, e.query_x, e.query_y), "inputs and labels disagree"),
        (lambda e: Episode(e.support_x, e.support_y * 2, e.query_x, e.query_y), "class 1 has no support example"),
        (lambda e: Episode(e.support_x * float("nan"), e.support_y, e.query_x, e.query_y), "support_x contains NaN"),
        (lambda e: Episode(e.support_x, e.support_y.float(), e.query_x, e.query_y), "both must be integer labels"),
    ],
)
def test_malformed_episodes_get_errors_naming_the_mismatch(bad, message):
    model = ProtoNet(MLP(8, (16,)))
    with pytest.raises((ValueError, TypeError), match=message):
        model.training_step(bad(episode()), 0)


def test_maml_head_size_must_match_the_episode_way():
    model = MAML(MLP(8, (16,), 5), inner_lr=0.1)
    with pytest.raises(ValueError, match="This is a 3-way episode but the model's head has 5 outputs"):
        model.training_step(episode(n=3), 0)


def test_protonet_refuses_regression_episodes():
    ep = episode()
    with pytest.raises(ValueError, match="ProtoNet classifies .* Use MAML or AttentionLearner"):
        ProtoNet(MLP(8, (4,))).training_step(Episode(ep.support_x, ep.support_y.float(), ep.query_x,
                                                     ep.query_y.float()), 0)


def test_episode_accuracy_mean_and_interval_match_numpy_formula():
    import numpy as np

    accs = np.array([0.2, 0.6, 0.8, 1.0, 0.4])
    m = EpisodeMean()
    m.update(torch.tensor(accs[:2]))
    m.update(torch.tensor(accs[2:]))
    mean, ci = m.compute()
    assert mean.item() == pytest.approx(accs.mean())
    assert ci.item() == pytest.approx(1.96 * accs.std(ddof=1) / np.sqrt(5), rel=1e-6)


def test_episode_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits of shape \[..., M, N\] and labels \[..., M\]"):
        EpisodeAccuracy().update(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_backbones_give_the_documented_shapes():
    assert Conv4()(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert Conv4(3, 32, 5, image_size=84)(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert ResNet12(channels=(4, 8, 8, 16), out_features=3)(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match="at least 16"):
        Conv4(image_size=8)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": 0}, r"Expected `lr` to be a positive number, but got 0"),
    ({"optimizer": "rmsprop"}, r"Expected `optimizer` to be one of"),
    ({"lr_scheduler": "linear"}, r"Expected `lr_scheduler` to be one of"),
    ({"nonfinite": "ignore"}, r"Expected `nonfinite` to be one of \('raise', 'skip'\)"),
])
def test_bad_optimizer_settings_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProtoNet(MLP(8, (4,)), **kwargs)


def test_cosine_schedule_and_sgd_configure():
    model = ProtoNet(MLP(8, (16,)), optimizer="sgd", lr_scheduler="cosine", lr=0.1)
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(model, blob_data())
    assert t.optimizers[0].param_groups[0]["lr"] < 0.1


@pytest.mark.parametrize("kwargs", [dict(max_epochs=3), dict(max_epochs=3, max_steps=5),
                                    dict(max_epochs=2, limit_train_batches=0.5),
                                    dict(max_epochs=2, limit_train_batches=3, accumulate_grad_batches=2)])
def test_cosine_schedule_length_equals_lightnings_estimate_without_iterating_the_loader_early(kwargs):
    # Lightning's estimated_stepping_batches iterates the training loader before a checkpoint is restored; the
    # learner computes the same number arithmetically so a resumed run starts at its saved episode
    model = ProtoNet(MLP(8, (16,)), lr_scheduler="cosine")
    t = trainer(limit_val_batches=0, **kwargs)
    t.fit(model, blob_data(train_episodes=16))
    assert model.total_training_steps() == t.estimated_stepping_batches
