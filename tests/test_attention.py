import pytest
import torch
from helpers import blob_data, episode, sine_data, trainer

from lightning_meta import AttentionLearner, Episode
from lightning_meta.models import MLP


def model(**kw):
    torch.manual_seed(0)
    args = dict(max_way=6, dim=32, depth=2, heads=4)
    args.update(kw)
    return AttentionLearner(MLP(8, (16,)), **args).eval()


def test_changing_a_query_label_never_changes_any_prediction():
    net, ep = model(query_attention=True), episode()
    out = net(ep)
    flipped = ep.query_y.clone()
    flipped[0, 0] = (flipped[0, 0] + 1) % 3
    torch.testing.assert_close(net(Episode(ep.support_x, ep.support_y, ep.query_x, flipped)), out)


def test_predictions_are_equivariant_to_relabelling_the_support_classes():
    net, ep = model(), episode(b=1)
    perm = torch.tensor([2, 0, 1])  # class c becomes perm[c]
    relabelled = Episode(ep.support_x, perm[ep.support_y], ep.query_x, perm[ep.query_y])
    out, out_relabelled = net(ep), net(relabelled)
    torch.testing.assert_close(out_relabelled[..., perm], out, atol=1e-5, rtol=1e-5)


def test_predictions_are_invariant_to_the_order_of_the_support_set():
    net, ep = model(), episode(b=1)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    shuffled = Episode(ep.support_x[:, order], ep.support_y[:, order], ep.query_x, ep.query_y)
    torch.testing.assert_close(net(shuffled), net(ep), atol=1e-5, rtol=1e-5)


def test_queries_are_independent_unless_query_attention_is_on():
    ep = episode(b=1)
    for transductive in (False, True):
        net = model(query_attention=transductive)
        alone = net(Episode(ep.support_x, ep.support_y, ep.query_x[:, :1], ep.query_y[:, :1]))
        together = net(ep)[:, :1]
        assert torch.allclose(alone, together, atol=1e-5) != transductive


def test_one_model_serves_any_number_of_ways_up_to_max_way():
    net = model()
    for n in (2, 4, 6):
        assert net(episode(n=n)).shape == (2, n * 3, n)
    with pytest.raises(ValueError, match=r"7 classes but the AttentionLearner was built for at most max_way=6"):
        net.training_step(episode(n=7), 0)


def test_attention_learner_learns_blobs_and_its_predictor_matches_the_batch_path():
    net = model(max_way=5)
    net.hparams.lr = 3e-3
    t = trainer(max_epochs=3)
    dm = blob_data(train_episodes=40)
    t.fit(net, dm)
    assert t.test(net, dm, verbose=False)[0]["test/acc"] > 0.8
    ep = episode(b=1)
    net.eval()
    torch.testing.assert_close(net.adapt(ep.support_x[0], ep.support_y[0])(ep.query_x[0]), net(ep)[0])


def test_attention_learner_does_sinusoid_regression():
    torch.manual_seed(0)
    net = AttentionLearner(MLP(1, (32,)), max_way=2, dim=32, heads=4, lr=3e-3)
    dm = sine_data(meta_batch_size=16, train_episodes=16 * 150, test_episodes=64)
    before = trainer().test(net, dm, verbose=False)[0]["test/mse"]
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(net, dm)
    assert t.test(net, dm, verbose=False)[0]["test/mse"] < 0.6 * before


def test_bad_attention_settings_are_rejected():
    with pytest.raises(ValueError, match=r"Expected `dim` \(30\) to be divisible by `heads` \(4\)"):
        AttentionLearner(MLP(8, (16,)), dim=30, heads=4)
    lazy = AttentionLearner(torch.nn.Linear(8, 6), max_way=5, dim=16)  # no stated width: one forward of an input (#23)
    episode = Episode(torch.randn(1, 3, 8), torch.arange(3)[None], torch.randn(1, 2, 8), torch.zeros(1, 2).long())
    assert lazy(episode).shape == (1, 2, 3) and lazy.hparams.embedding_dim == 6
