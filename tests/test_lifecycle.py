"""A learner's numbers survive what Lightning, torch and users do to a module after it is built: deep copies (EMA,
`AveragedModel`, Lightning's `StochasticWeightAveraging`), pickles (`ddp_spawn`), layer conversions
(`sync_batchnorm`) and replaced layers. The MAML engine derives everything it runs from the module it is called
with, so a copy never runs the original's modules."""

import copy
import pickle

import pytest
import torch
from helpers import blob_data, trainer
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_meta import ANIL, MAML, Episode, MetaSGD
from lightning_meta.models import MLP, Conv4


def image_episode(b=2, n=5, k=1, q=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(b, n * k, 1, 28, 28, generator=g), torch.arange(n).repeat_interleave(k).repeat(b, 1),
                   torch.rand(b, n * q, 1, 28, 28, generator=g), torch.arange(n).repeat_interleave(q).repeat(b, 1))


def conv_learner(cls=MAML, **kw):
    torch.manual_seed(0)
    return cls(Conv4(hidden=8, out_features=5, image_size=28), inner_lr=0.4, **kw)


def queries_alone(learner, ep):
    """Each query predicted on its own (a meta-batch with one query per task), stacked back."""
    return torch.cat([learner(Episode(ep.support_x, ep.support_y, ep.query_x[:, i:i + 1], ep.query_y[:, i:i + 1]))
                      for i in range(ep.query_x.shape[1])], 1)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "averaged_model": AveragedModel,  # torch.optim.swa_utils: a deep copy behind a wrapper
}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize(("cls", "engine"), [(MAML, "loop"), (MAML, "vmap"), (ANIL, "auto"), (MetaSGD, "loop")])
def test_a_copy_gives_the_original_s_logits_and_keeps_the_support_statistics_guarantee(how, cls, engine):
    # before: a deep copy's inner loop ran the original's modules; their batch-norm hooks never fired in the copy,
    # so its logits differed by 0.104 and a query alone vs in a batch by 0.143; a pickle failed outright
    original = conv_learner(cls, task_parallel=engine).eval()
    ep = image_episode()
    want = original(ep)
    twin = COPIES[how](original)
    torch.testing.assert_close(twin(ep), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(queries_alone(twin, ep), twin(ep), atol=1e-6, rtol=1e-6)
    learner = twin.module if how == "averaged_model" else twin
    predicted = learner.adapt(ep.support_x[0], ep.support_y[0])(ep.query_x[0])
    torch.testing.assert_close(predicted, want[0], atol=1e-5, rtol=1e-5)


def test_a_copy_s_modes_reach_the_modules_it_runs():
    # before: with the original in training mode, the evaluated copy ran the original's dropout (1.65 apart)
    torch.manual_seed(0)
    net = MLP(8, (16,), 3)
    net.features = nn.Sequential(*net.features, nn.Dropout(0.5))
    original = MAML(net, inner_lr=0.3, task_parallel="vmap").train()
    twin = copy.deepcopy(original).eval()
    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.randn(2, 6, 8, generator=g), torch.arange(3).repeat(2, 2), torch.randn(2, 6, 8, generator=g),
                 torch.arange(3).repeat(2, 2))
    torch.testing.assert_close(twin(ep), twin(ep), atol=0, rtol=0)
    torch.testing.assert_close(twin(ep), original.eval()(ep), atol=1e-6, rtol=1e-6)


def test_a_replaced_or_reloaded_layer_is_the_one_that_runs():
    learner = conv_learner(task_parallel="loop").eval()
    ep = image_episode()
    other = conv_learner(task_parallel="loop").eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    learner.backbone.features[0] = copy.deepcopy(other.backbone.features[0])  # a replaced block
    learner.backbone.head = copy.deepcopy(other.backbone.head)
    learner.load_state_dict(other.state_dict())
    torch.testing.assert_close(learner(ep), other(ep), atol=1e-6, rtol=1e-6)


def test_synchronised_batch_norm_is_refused_with_the_reason():
    # Trainer(sync_batchnorm=True) converts the batch norms after the learner is built: the engine used to keep the
    # old ones (logits 0.104 off); pooling statistics across processes would mix different tasks, so it is refused.
    # (A real CPU run cannot reach this: DDP itself refuses SyncBatchNorm on CPU modules; on a GPU the first
    # forward, in Lightning's sanity check, raises this)
    for cls in (MAML, ANIL):
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(conv_learner(cls, task_parallel="loop"))
        with pytest.raises(ValueError, match=r"SyncBatchNorm.*each process adapts to its own tasks.*sync_batchnorm=True"):
            learner(image_episode())


def test_stochastic_weight_averaging_trains_a_maml_and_averages_its_weights():
    # before: Lightning's SWA stopped with a bare AssertionError (MAML's batch norms keep no running statistics)
    class Snapshots(Callback):
        def __init__(self):
            self.weights = []

        def on_fit_start(self, trainer, pl_module):
            self.weights.append([p.detach().clone() for p in pl_module.parameters()])

        def on_train_epoch_end(self, trainer, pl_module):
            self.weights.append([p.detach().clone() for p in pl_module.parameters()])

    torch.manual_seed(0)
    net = MLP(8, (16,), 3)
    net.features = nn.Sequential(*net.features, nn.BatchNorm1d(16))
    learner, snapshots = MAML(net, inner_lr=0.3), Snapshots()
    t = trainer(max_epochs=3, callbacks=[snapshots, StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)],
                limit_val_batches=0)
    t.fit(learner, blob_data(meta_batch_size=2, train_episodes=8))
    assert t.current_epoch == 3  # no extra epoch to recompute running statistics that MAML does not keep
    # Lightning's SWA from epoch 1 of 3 averages the initial weights and those after epochs 0 and 1
    start, after0, after1, last = snapshots.weights
    for got, a, b, c in zip(learner.parameters(), start, after0, after1):
        torch.testing.assert_close(got, (a + b + c) / 3, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(got, final) for got, final in zip(learner.parameters(), last))
    learner.eval()
    assert torch.isfinite(learner(blob_episode())).all()


def blob_episode():
    g = torch.Generator().manual_seed(3)
    return Episode(torch.randn(2, 6, 8, generator=g), torch.arange(3).repeat(2, 2), torch.randn(2, 9, 8, generator=g),
                   torch.arange(3).repeat(2, 3))


def _spawn_fit(devices, meta_batch, **trainer_kw):
    torch.manual_seed(0)
    learner = MAML(MLP(8, (16,), 3), inner_lr=0.3, task_parallel="loop", lr=3e-3)
    t = trainer(accelerator="cpu", devices=devices, max_steps=3, limit_val_batches=0,
                **({"strategy": "ddp_spawn"} if devices > 1 else {}), **trainer_kw)
    t.fit(learner, blob_data(meta_batch_size=meta_batch, train_episodes=8 * 3))
    return [p.detach().clone() for p in learner.parameters()]


def test_a_maml_fit_under_ddp_spawn_runs_and_equals_one_process():
    # ddp_spawn pickles the learner to start its processes: before, MAML could not be pickled (a closure)
    spawned, single = _spawn_fit(2, 2), _spawn_fit(1, 4)
    for a, b in zip(spawned, single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

