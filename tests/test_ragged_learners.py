"""ProtoNet, AttentionLearner and the Pretrainer's evaluation on ragged meta-batches (variable ways and shots, #29):
each task computes what it computes alone, the backbone sees only real examples, and the callbacks and the
PredictionWriter handle such batches."""

import warnings

import lightning as L
import pytest
import torch
from matplotlib.axes import Axes
from torch.utils.data import DataLoader

from lightning_meta import AttentionLearner, Episode, Pretrainer, ProtoNet, RaggedEpisode
from lightning_meta.callbacks import AdaptationCurve, EpisodeGrid
from lightning_meta.cli import PredictionWriter
from lightning_meta.compile import CompileFallbackWarning, compile_counts
from lightning_meta.models import MLP, Conv4

SHAPES = [([1, 3, 1, 5, 2, 1, 4], 9), ([2, 2], 3), ([1, 1, 2, 1], 6)]  # (shots per class, queries) per task


def task(shots, queries, dim=6, seed=0, dtype=torch.float64, image=None):
    g = torch.Generator().manual_seed(seed)
    shape = image or (dim,)
    sy = torch.cat([torch.full((k,), c) for c, k in enumerate(shots)])
    sy = sy[torch.randperm(len(sy), generator=g)]  # not class-major: no learner may rely on the order
    qy = torch.arange(queries) % len(shots)
    return Episode(torch.rand(len(sy), *shape, generator=g, dtype=dtype), sy,
                   torch.rand(queries, *shape, generator=g, dtype=dtype), qy)


def ragged(shapes=SHAPES, seed=0, **kw):
    return [task(s, q, seed=seed + i, **kw) for i, (s, q) in enumerate(shapes)]


def one(t):
    return Episode(*(f[None] for f in t))


LEARNERS = {
    "protonet": lambda: ProtoNet(MLP(6, (16, 8))),
    "protonet-cosine": lambda: ProtoNet(MLP(6, (16, 8)), distance="cosine"),
    "attention": lambda: AttentionLearner(MLP(6, (16, 8)), max_way=8, dim=16, heads=2),
    "attention-transductive": lambda: AttentionLearner(MLP(6, (16, 8)), max_way=8, dim=16, heads=2,
                                                       query_attention=True),
    "pretrainer": lambda: Pretrainer(MLP(6, (16, 8)), num_classes=5),
}


def build(name):
    torch.manual_seed(0)
    return LEARNERS[name]().double()


def loss_and_gradient(net, batch):
    net.zero_grad()
    loss = net.meta_loss(net.prepare_episode(batch), net(batch))
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters() if p.requires_grad]
    return loss.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_ragged_meta_loss_and_meta_gradient_are_the_mean_of_each_tasks_own(name):
    net, tasks = build(name), ragged()
    net.train(name != "pretrainer")  # the Pretrainer meets episodes in evaluation only
    loss, grad = loss_and_gradient(net, RaggedEpisode.from_tasks(tasks))
    alone = [loss_and_gradient(net, one(t)) for t in tasks]
    expected_loss = torch.stack([a[0] for a in alone]).mean()
    expected_grad = torch.stack([a[1] for a in alone]).mean(0)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert expected_grad.norm() > 0
    assert (grad - expected_grad).norm() <= 1e-5 * expected_grad.norm()


@pytest.mark.parametrize("name", ["protonet", "attention"])
def test_with_batch_norm_each_task_sees_only_its_own_examples_and_trains_as_it_does_alone(name):
    torch.manual_seed(0)
    backbone = Conv4(hidden=4)  # batch norm in training mode: statistics of the examples of one backbone call
    net = ProtoNet(backbone) if name == "protonet" else AttentionLearner(backbone, max_way=8, dim=16, heads=2)
    seen = []
    backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    tasks = ragged([([1, 3, 2], 9), ([2, 2], 3), ([1, 1, 2, 1], 6)], dtype=torch.float64, image=(1, 28, 28))
    net.double().train()
    batch = RaggedEpisode.from_tasks(tasks)
    loss = net.meta_loss(batch, net(batch))
    assert seen == [6 + 9, 4 + 3, 5 + 6]  # one call per task, on its own real examples: never padding, never another's
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    alone = [net.meta_loss(one, net(one)) for one in (Episode(*(f[None] for f in t)) for t in tasks)]
    expected = torch.stack(alone).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
            for gs in (grads, torch.autograd.grad(expected, params, allow_unused=True))]
    assert flat[1].norm() > 0 and (flat[0] - flat[1]).norm() <= 1e-6 * flat[1].norm()


@pytest.mark.parametrize("name,head", [("protonet", "prototype"), ("protonet", "logistic"), ("protonet-cosine", None),
                                       ("attention", None), ("attention-transductive", None), ("pretrainer", None)])
def test_evaluation_outputs_of_each_task_equal_what_adapt_predicts_for_it(name, head):
    net = build(name)
    if head is not None:
        net.hparams.head = head
    net.eval()
    tasks = ragged()
    batch = RaggedEpisode.from_tasks(tasks)
    with torch.no_grad():
        outputs = net(batch)
    assert outputs.shape == (3, 9, 7)
    for i, (t, own) in enumerate(zip(tasks, batch.unpad_outputs(outputs))):
        torch.testing.assert_close(own, net.adapt(t.support_x, t.support_y)(t.query_x), rtol=1e-5, atol=1e-5)
        cells = torch.zeros(9, 7, dtype=torch.bool)
        cells[: len(t.query_y), : batch.ways[i]] = True
        assert torch.isinf(outputs[i][~cells]).all() and (outputs[i][~cells] < 0).all()
        assert torch.isfinite(outputs[i][cells]).all()


@pytest.mark.parametrize("name", ["protonet", "attention", "pretrainer"])
def test_adapt_takes_an_imbalanced_seven_way_support_set(name):
    net, t = build(name), task([1, 3, 1, 5, 2, 1, 4], 11)
    assert net.adapt(t.support_x, t.support_y)(t.query_x).shape == (11, 7)


@pytest.mark.parametrize("transductive", [False, True])
def test_attention_never_reads_another_tasks_tokens_or_padding(transductive):
    net = build("attention-transductive" if transductive else "attention").eval()
    a, small, big = task([2, 1, 3], 4, seed=1), task([1, 1], 2, seed=2), task([3, 1, 2, 2, 4, 1, 1, 2], 30, seed=3)
    with torch.no_grad():
        with_small = net(RaggedEpisode.from_tasks([a, small]))[0, :4, :3]
        with_big = net(RaggedEpisode.from_tasks([a, big]))[0, :4, :3]  # many more tokens, ways and queries beside a
        alone = net(one(a))[0]
    torch.testing.assert_close(with_small, alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_big, alone, rtol=1e-6, atol=1e-6)


def test_attention_refuses_a_task_with_more_ways_than_max_way():
    net = AttentionLearner(MLP(6, (16, 8)), max_way=5, dim=16, heads=2).double()
    batch = RaggedEpisode.from_tasks([task([1, 1], 2), task([1] * 7, 7)])
    with pytest.raises(ValueError, match=r"Task 1 of this ragged meta-batch has 7 classes but the AttentionLearner was "
                                         r"built for at most max_way=5: cap .*max_way=5.* or build it with max_way>=7"):
        net.training_step(batch, 0)


@pytest.mark.parametrize("name", ["protonet", "attention"])
def test_a_compiling_learner_runs_ragged_batches_eagerly_saying_so_once_and_compiles_nothing(name):
    torch.manual_seed(0)
    backbone = MLP(6, (16, 8))
    net = ProtoNet(backbone, compile=True) if name == "protonet" else AttentionLearner(
        backbone, max_way=8, dim=16, heads=2, compile=True)
    net = net.double()
    reference = build(name)
    before = compile_counts()
    with pytest.warns(CompileFallbackWarning, match="runs eagerly on ragged meta-batches .*fixed-shape meta-batches "
                                                    "stay compiled"):
        first = net(RaggedEpisode.from_tasks(ragged()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        net(RaggedEpisode.from_tasks(ragged(seed=5)))  # said once
    assert compile_counts() == before
    torch.testing.assert_close(first, reference(RaggedEpisode.from_tasks(ragged())))


# ---------------------------------------------------------------------------------------------- a real Trainer
IMAGE = (1, 28, 28)
VAL_SHAPES = [([2, 1, 3], 4), ([1, 1], 3), ([2, 2, 1, 1], 5)]


def image_batches(count, shapes, seed):
    """Ragged meta-batches of uint8 images, as an episode stream yields them."""
    out = []
    for b in range(count):
        tasks = [task(s, q, seed=seed + 10 * b + i, dtype=torch.float32, image=IMAGE) for i, (s, q) in
                 enumerate(shapes)]
        out.append(RaggedEpisode.from_tasks([Episode((t.support_x * 255).to(torch.uint8), t.support_y,
                                                     (t.query_x * 255).to(torch.uint8), t.query_y) for t in tasks]))
    return out


def loader(batches):
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def fit(callbacks, tmp_path, val=VAL_SHAPES):
    torch.manual_seed(0)
    net = ProtoNet(Conv4(hidden=4))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=callbacks)
    trainer.fit(net, loader(image_batches(2, [([1, 2], 2), ([3, 1, 1], 4)], seed=100)),
                loader(image_batches(1, val, seed=200)))
    return net, trainer


def test_the_episode_grid_draws_each_task_of_a_ragged_validation_batch(tmp_path, monkeypatch):
    drawn, titles = [], []
    monkeypatch.setattr(Axes, "imshow", lambda self, img, **kw: drawn.append(torch.as_tensor(img).clone()))
    monkeypatch.setattr(Axes, "set_title", lambda self, text, **kw: titles.append(text))
    grid = EpisodeGrid(num_episodes=3, max_queries=4)
    net, _ = fit([grid], tmp_path)
    (batch,) = image_batches(1, VAL_SHAPES, seed=200)
    expected, expected_titles = [], []
    with torch.no_grad():
        outputs = net.eval()(batch)
    for t, logits in zip(batch.tasks(), batch.unpad_outputs(outputs)):
        s, q = len(t.support_y), min(len(t.query_y), 4)
        for j in range(max(s, q)):  # column by column: support j, then query j
            if j < s:
                expected.append(t.support_x[j])
                expected_titles.append(str(int(t.support_y[j])))
            if j < q:
                expected.append(t.query_x[j])
                expected_titles.append(f"{int(logits[j].argmax())}/{int(t.query_y[j])}")
    assert len(drawn) == len(expected) == 6 + 4 + 2 + 3 + 6 + 4
    for shown, raw in zip(drawn, expected):
        torch.testing.assert_close(shown, raw[0].float() / 255, atol=1e-6, rtol=0)
    assert titles == expected_titles
    assert len(grid.saved) == 1 and (tmp_path / "episodes" / "epoch000.png").is_file()


def test_the_adaptation_curve_keeps_at_most_s_shots_of_each_class_of_each_task(tmp_path):
    curve = AdaptationCurve(num_episodes=3)
    net, _ = fit([curve], tmp_path)
    (batch,) = image_batches(1, VAL_SHAPES, seed=200)
    (point,) = curve.history
    assert [s for s, _ in point["shots"]] == [1, 2, 3]  # the most shots of a class is 3
    net.eval()
    with torch.no_grad():
        prepared = net.prepare_episode(batch)
        full = float(prepared.task_accuracies(net(batch)).mean())
        accuracies = []
        for t in batch.tasks():  # the first support example of each class
            first = torch.stack([(t.support_y == c).nonzero()[0, 0] for c in range(int(t.support_y.max()) + 1)])
            logits = net.adapt(t.support_x[first], t.support_y[first])(t.query_x)
            accuracies.append(float((logits.argmax(-1) == t.query_y).float().mean()))
    assert point["shots"][-1][1] == pytest.approx(full)
    assert point["shots"][0][1] == pytest.approx(sum(accuracies) / 3)


def test_the_prediction_writer_saves_each_tasks_own_logits_and_labels(tmp_path):
    writer = PredictionWriter()
    net, trainer = fit([], tmp_path)
    batches = image_batches(2, VAL_SHAPES, seed=300)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[writer])
    trainer.predict(net, loader(batches))
    saved = torch.load(writer.path, weights_only=True)
    assert len(saved["predictions"]) == len(saved["query_y"]) == 2
    net.eval()
    for logits, labels, batch in zip(saved["predictions"], saved["query_y"], batches):
        with torch.no_grad():
            expected = batch.unpad_outputs(net(batch))
        assert [tuple(x.shape) for x in logits] == [(4, 3), (3, 2), (5, 4)]
        for got, want, y, t in zip(logits, expected, labels, batch.tasks()):
            torch.testing.assert_close(got, want)
            assert torch.equal(y, t.query_y)
