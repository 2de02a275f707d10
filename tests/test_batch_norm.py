"""Batch norm a deployment can reproduce: with `batch_norm="support"` (the default) a MAML-family query's prediction
is the same alone and in any batch, on every engine; `"transductive"` (the MAML paper's code) is kept for published
numbers, and the mode survives a checkpoint."""

import pytest
import torch
from helpers import trainer

from lightning_meta import ANIL, MAML, Episode, EpisodicDataModule, MetaSGD
from lightning_meta.data import TensorClassDataset
from lightning_meta.models import Conv4

CLASSES = {"maml": MAML, "anil": ANIL, "metasgd": MetaSGD}


def batch(b=2, n=5, q=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(b, n, 1, 28, 28, generator=g), torch.arange(n).repeat(b, 1),
                   torch.rand(b, q, 1, 28, 28, generator=g),
                   torch.arange(n).repeat_interleave(q // n).repeat(b, 1))


def build(name, parallel, batch_norm="support"):
    torch.manual_seed(0)
    return CLASSES[name](Conv4(hidden=8, out_features=5), inner_lr=0.4, inner_steps=2, task_parallel=parallel,
                         batch_norm=batch_norm).eval()


def subset(ep, idx):
    return Episode(ep.support_x, ep.support_y, ep.query_x[:, idx], ep.query_y[:, idx])


@pytest.mark.parametrize("parallel", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_a_querys_logits_do_not_depend_on_the_other_queries(name, parallel):
    model, ep = build(name, parallel), batch()
    together = model(ep)  # 15 queries at once
    alone = torch.cat([model(subset(ep, [j])) for j in range(15)], 1)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(1))[:7]
    torch.testing.assert_close(model(subset(ep, order)), together[:, order], atol=1e-5, rtol=1e-5)
    task = ep.task(0)
    predictor = model.adapt(task.support_x, task.support_y)  # deployment: one image at a time
    one_by_one = torch.cat([predictor(task.query_x[j : j + 1]) for j in range(15)])
    torch.testing.assert_close(one_by_one, together[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CLASSES))
def test_transductive_mode_keeps_the_batch_dependence_of_the_papers_code(name):
    model, ep = build(name, "loop", "transductive"), batch()
    together = model(ep)
    pair = model(subset(ep, [0, 1]))
    assert (pair - together[:, :2]).abs().max() > 1e-3  # two queries' statistics are not fifteen's
    task = ep.task(0)
    predictor = model.adapt(task.support_x, task.support_y)
    torch.testing.assert_close(predictor(task.query_x), together[0], atol=1e-5, rtol=1e-5)  # eval path = adapt()


@pytest.mark.parametrize("batch_norm", ["support", "transductive"])
def test_the_mode_survives_a_checkpoint_and_test_equals_adapt_in_it(batch_norm, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = lambda s: TensorClassDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(4),  # noqa: E731
                                          [f"{s}{i}" for i in range(10)])
    dm = EpisodicDataModule(train=images("a"), test=images("b"), n_way=5, n_shot=1, n_query=3, meta_batch_size=2,
                            train_episodes=4, test_episodes=4)
    model = MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, batch_norm=batch_norm)
    t = trainer(max_steps=2, default_root_dir=tmp_path, limit_val_batches=0)
    t.fit(model, dm)
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MAML.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.hparams.batch_norm == batch_norm and loaded.engine.batch_norm == batch_norm
    ep = next(iter(dm.test_dataloader()))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ep), model(ep))
    predicted = torch.cat(t.predict(model, dm))
    task = ep.task(0)
    torch.testing.assert_close(model.adapt(task.support_x, task.support_y)(task.query_x), predicted[0],
                               atol=1e-5, rtol=1e-5)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"Expected `batch_norm` to be one of \('support', 'transductive'\), but got "
                                         r"'running'"):
        MAML(Conv4(hidden=8, out_features=5), inner_lr=0.4, batch_norm="running")
