"""The MAML family on ragged meta-batches (#29): tasks of different ways, shots and queries in one meta-batch, on
every engine, each task using the head's first N_i outputs; Proto-MAML's head start (``head_init="prototypes"``).

Exactness in float64: the meta-loss and meta-gradients of a ragged meta-batch equal a hand-written reference (each
task's inner loop by ``torch.func.grad`` over its own body, the head's first N_i rows or its prototype start, as
separate variables), and the mean of the tasks' own meta-gradients, each task run alone as a meta-batch of one (the
batch-norm network); evaluation logits equal ``adapt(support)(query)`` task by task."""

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import blobs, trainer
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_meta import ANIL, MAML, Episode, MetaSGD, RaggedEpisode
from lightning_meta.compile import CompileFallbackWarning
from lightning_meta.data import VariableEpisodes
from lightning_meta.models import MLP

TOL = 1e-9  # of each tensor's largest magnitude, float64 (the brief asks 1e-5; agreement is ~1e-15)


def task(n, shots, queries, shape=(4,), seed=0, dtype=torch.float64):
    """One task of ``n`` classes (``shots[k]`` support examples of class k, ``queries`` per class), no batch dim."""
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(n).repeat_interleave(torch.tensor(shots))
    qy = torch.arange(n).repeat_interleave(queries)
    return Episode(torch.randn(len(sy), *shape, generator=g, dtype=dtype), sy,
                   torch.randn(len(qy), *shape, generator=g, dtype=dtype), qy)


def ragged_tasks(shape=(4,), dtype=torch.float64):
    """Five tasks in four shapes (tasks 0 and 2 share one): imbalanced shots, 2 to 5 ways, 1 to 3 queries a class."""
    spec = [(3, [1, 2, 1], 2), (5, [1] * 5, 1), (3, [1, 2, 1], 2), (2, [3, 1], 3), (4, [2, 1, 1, 1], 2)]
    return [task(n, shots, q, shape, seed=i, dtype=dtype) for i, (n, shots, q) in enumerate(spec)]


ENGINES = {
    "vmap": dict(task_parallel="vmap"),  # each shape group in one vmap, the graph kept for Lightning's backward
    "vmap_chunks": dict(task_parallel="vmap", task_chunk=2),  # chunks of a group, meta-gradients streamed
    "vmap_chunks_unstreamed": dict(task_parallel="vmap", task_chunk=2, stream_meta_gradients=False),
    "loop": dict(task_parallel="loop"),  # task by task, streamed
    "loop_chunks": dict(task_parallel="loop", task_chunk=2),
    "loop_unstreamed": dict(task_parallel="loop", stream_meta_gradients=False),
    "compiled": dict(task_parallel="vmap", task_chunk=2, compile={"backend": "aot_eager"}),
}
VARIANTS = {
    "maml": (MAML, dict(inner_steps=2)),
    "first_order": (MAML, dict(inner_steps=2, first_order=True)),
    "per_step_rates_msl": (MAML, dict(inner_steps=2, per_step_lr=True, multi_step_loss=True)),
    "anil": (ANIL, dict(inner_steps=2)),
    "metasgd": (MetaSGD, dict(inner_steps=2)),
    "proto_maml": (MAML, dict(inner_steps=2, head_init="prototypes")),
    "fo_proto_maml": (MAML, dict(inner_steps=2, first_order=True, head_init="prototypes")),
    "proto_anil": (ANIL, dict(inner_steps=2, head_init="prototypes")),
    "proto_metasgd": (MetaSGD, dict(inner_steps=2, head_init="prototypes")),
}
COMPILED_VARIANTS = ("maml", "proto_maml")  # tracing costs seconds per shape group: two variants cover the core


def gelu_mlp():
    """A linear chain whose gradient the hand-written batched chain does not cover: vmap takes autograd's."""
    net = MLP(4, (8,), 6)
    net.features[2] = nn.GELU()
    return net


NETS = {"mlp": lambda: MLP(4, (8,), 6), "gelu": gelu_mlp}


def build(variant, engine, net="mlp", **extra):
    cls, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    return cls(NETS[net](), inner_lr=0.3, **kwargs, **ENGINES[engine], **extra).double()


def rate(learner, step, name, n, head):
    """The inner rate of parameter ``name`` at ``step`` from the learner's documented layout; a head's rates shaped
    like it (Meta-SGD) cut to the task's ``n`` classes."""
    stored = dict(learner.named_parameters()).get("inner_lrs." + name.replace(".", "__"))
    if stored is None:
        return learner.hparams.inner_lr
    if learner.hparams.per_step_lr:
        stored = stored[step]
    if stored.dim() == 0 or stored.shape == (1,):
        return stored.reshape(())
    return stored[:n] if head else stored


def reference_meta_loss(learner, tasks):
    """The meta-loss of ``tasks`` written from the papers: per task, the body (MAML) and the head's first N rows (or
    Proto-MAML's W = 2c, b = -|c|^2 from the support features' prototypes) adapted by ``torch.func.grad`` as separate
    variables; the mean over tasks of each task's query loss (MSL-weighted over steps)."""
    hp, net = learner.hparams, learner.backbone
    anil = isinstance(learner, ANIL)
    params = dict(net.named_parameters())
    names = ("weight", "bias") if anil else ("head.weight", "head.bias")
    total = 0
    for sx, sy, qx, qy in tasks:
        n = int(sy.max()) + 1
        if anil:
            sx, qx = net.forward_features(sx), net.forward_features(qx)
            body = {}
        else:
            body = {k.removeprefix("features."): v for k, v in params.items() if k.startswith("features.")}

        def features(body, x):
            return x if anil else functional_call(net.features, body, (x,))

        if hp.head_init == "prototypes":
            h = features(body, sx)
            onehot = F.one_hot(sy, n).to(h.dtype)
            c = onehot.T @ h / onehot.sum(0)[:, None]
            weight, bias = 2 * c, -(c * c).sum(1)
        else:
            weight, bias = params["head.weight"][:n], params["head.bias"][:n]

        def support_loss(body, weight, bias, sx=sx, sy=sy):
            return F.cross_entropy(F.linear(features(body, sx), weight, bias), sy)

        losses = []
        for step in range(hp.inner_steps):
            g_body, g_weight, g_bias = torch.func.grad(support_loss, argnums=(0, 1, 2))(body, weight, bias)
            if hp.first_order:
                g_body, g_weight, g_bias = {k: g.detach() for k, g in g_body.items()}, g_weight.detach(), g_bias.detach()
            body = {k: v - rate(learner, step, "features." + k, n, False) * g_body[k] for k, v in body.items()}
            weight = weight - rate(learner, step, names[0], n, True) * g_weight
            bias = bias - rate(learner, step, names[1], n, True) * g_bias
            losses.append(F.cross_entropy(F.linear(features(body, qx), weight, bias), qy))
        total = total + ((learner.msl_weights().to(weight) * torch.stack(losses)).sum() if hp.multi_step_loss
                         else losses[-1])
    return total / len(tasks)


def trained(learner):
    return [p for p in learner.parameters() if p.requires_grad]


def assert_scaled_close(got, want, what, tol=TOL):
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-300)
    error = (got - want).abs().max().item()
    assert error <= tol * scale, f"{what}: {error:.3g} apart at scale {scale:.3g}"


def check_against_reference(variant, engine, net="mlp"):
    tasks = ragged_tasks()
    reference = build(variant, engine, net)
    expected_loss = reference_meta_loss(reference, tasks)
    expected = torch.autograd.grad(expected_loss, trained(reference))  # every trained parameter is used
    learner = build(variant, engine, net)
    loss = learner.training_step(RaggedEpisode.from_tasks(tasks), 0)
    assert_scaled_close(loss, expected_loss, f"{variant}, {engine}: meta-loss")
    for i, (got, want) in enumerate(zip(torch.autograd.grad(loss, trained(learner)), expected, strict=True)):
        assert_scaled_close(got, want, f"{variant}, {engine}: meta-gradient {i}")


# the compiled engine must compile: a fallback to eager would compare the eager numbers twice
pytestmark = pytest.mark.filterwarnings("error::lightning_meta.compile.CompileFallbackWarning")


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "compiled"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_ragged_meta_batch_trains_as_the_reference_on_every_eager_engine(variant, engine):
    check_against_reference(variant, engine)


@pytest.mark.parametrize("engine", ["vmap", "loop"])
@pytest.mark.parametrize("variant", ["maml", "proto_maml", "fo_proto_maml"])
def test_a_network_outside_the_hand_written_gradient_trains_as_the_reference(variant, engine):
    # GELU: vmap's inner gradients by autograd, where Proto-MAML's head must count as a variable of its own
    check_against_reference(variant, engine, net="gelu")


@pytest.fixture
def ragged_eager():
    """compile=True runs ragged meta-batches eagerly (said, and tested below): that warning only is not an error (a
    filter set here goes before the module's "error" mark, which pytest installs around the whole test)."""
    warnings.filterwarnings("ignore", message=".*runs eagerly on ragged meta-batches", category=CompileFallbackWarning)


RAGGED_EAGER = pytest.mark.usefixtures("ragged_eager")


@pytest.mark.parametrize("variant", COMPILED_VARIANTS)
def test_a_compiling_learner_runs_a_ragged_meta_batch_eagerly_saying_so_with_the_reference_numbers(variant):
    # every mix of task shapes would be a new static-shape graph (Meta-Dataset's episodes almost never repeat one)
    with pytest.warns(CompileFallbackWarning, match="inner loop runs eagerly on ragged meta-batches"):
        check_against_reference(variant, "compiled")


@pytest.mark.parametrize("engine", ["vmap", "loop_chunks"])
@pytest.mark.parametrize("variant", ["maml", "proto_maml"])
def test_with_batch_norm_the_ragged_meta_gradient_is_the_mean_of_each_task_s_own(variant, engine):
    # each task normalised with its own support statistics, as when it is a meta-batch of one: padding never enters
    tasks = ragged_tasks(shape=(1, 8, 8))[:4]

    def learner(**extra):
        cls, kwargs = VARIANTS[variant]
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(4 * 4 * 4, 6))
        return cls(net, inner_lr=0.3, **kwargs, **ENGINES[engine], **extra).double()

    ragged = learner()
    loss = ragged.training_step(RaggedEpisode.from_tasks(tasks), 0)
    got = torch.autograd.grad(loss, trained(ragged))
    alone = learner(variable_ways=True)  # a task narrower than the head, alone: its first N_i outputs
    losses = [alone.training_step(Episode(*(f[None] for f in t)), 0) for t in tasks]
    expected_loss = torch.stack(losses).mean()
    expected = torch.autograd.grad(expected_loss, trained(alone))
    assert_scaled_close(loss, expected_loss, "meta-loss")
    for i, (g, want) in enumerate(zip(got, expected, strict=True)):
        assert_scaled_close(g, want, f"meta-gradient {i}", tol=1e-9)


@RAGGED_EAGER
@pytest.mark.parametrize(("variant", "engine"), [(v, e) for v in ("maml", "anil", "metasgd", "proto_maml")
                                                  for e in ENGINES if e != "compiled"] + [("proto_maml", "compiled")])
def test_evaluation_logits_of_each_task_are_what_adapt_gives_it(variant, engine):
    # compiled: one variant, three tasks (tracing costs seconds per shape)
    tasks = ragged_tasks()[:3] if engine == "compiled" else ragged_tasks()
    batch = RaggedEpisode.from_tasks(tasks)
    learner = build(variant, engine, eval_inner_steps=3, variable_ways=True).eval()
    with torch.inference_mode():  # as Lightning validates and tests
        logits = learner(batch)
        steps = learner.step_outputs(batch)
    b, m, n = batch.num_tasks, batch.max_query, batch.num_ways
    assert logits.shape == (b, m, n) and steps.shape == (b, 4, m, n)  # [B, M_max, N_max], [B, steps + 1, ...]
    own = batch.mask()[:, :, None] & batch.way_mask()[:, None, :]
    assert torch.isneginf(logits[~own]).all() and torch.isfinite(logits[own]).all()
    torch.testing.assert_close(steps[:, -1], logits, rtol=0, atol=0)
    for i, t in enumerate(tasks):
        predicted = learner.adapt(t.support_x, t.support_y)(t.query_x)
        n, m = batch.ways[i], batch.query_sizes[i]
        assert predicted.shape == (m, n)
        assert_scaled_close(logits[i, :m, :n], predicted, f"task {i}", tol=1e-7)
    per_task = batch.task_losses(logits)  # each task's own cells: the loss of its own logits
    torch.testing.assert_close(per_task[1], F.cross_entropy(logits[1, :5, :5], tasks[1].query_y))


def test_adapt_on_an_imbalanced_7_way_task_with_a_10_output_head_gives_7_logits():
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(7).repeat_interleave(torch.tensor([1, 4, 2, 1, 3, 1, 2]))
    sx, qx = torch.randn(len(sy), 4, generator=g), torch.randn(5, 4, generator=g)
    for learner in (MAML(MLP(4, (8,), 10), inner_lr=0.3, variable_ways=True),
                    ANIL(MLP(4, (8,), 10), inner_lr=0.3, variable_ways=True),
                    MetaSGD(MLP(4, (8,), 10), inner_lr=0.3, head_init="prototypes")):
        predictor = learner.adapt(sx, sy)
        assert predictor(qx).shape == (5, 7) and predictor.n_way == 7
    with pytest.raises(ValueError, match=r"7-way episode but the model's head has 10 outputs.*variable_ways=True"):
        MAML(MLP(4, (8,), 10), inner_lr=0.3).adapt(sx, sy)  # episodes of one way: a wider head is still refused


def direct_proto_logits(net, t):
    """Proto-MAML's query logits before any step, by hand: the penultimate features of the support set, their
    prototypes, W = 2c, b = -|c|^2; and the support loss they start the first step from."""
    h, hq = net.forward_features(t.support_x), net.forward_features(t.query_x)
    n = int(t.support_y.max()) + 1
    c = torch.stack([h[t.support_y == k].mean(0) for k in range(n)])
    weight, bias = 2 * c, -(c * c).sum(1)
    return hq @ weight.T + bias, F.cross_entropy(h @ weight.T + bias, t.support_y)


@RAGGED_EAGER
@pytest.mark.parametrize(("cls", "engine"), [(c, e) for c in (MAML, ANIL, MetaSGD) for e in ("vmap", "loop")]
                         + [(MAML, "compiled")])
def test_proto_maml_starts_each_task_s_head_at_its_prototypes(cls, engine):
    torch.manual_seed(0)
    learner = cls(MLP(4, (8,), 6), inner_lr=0.3, head_init="prototypes", **ENGINES[engine]).double().eval()
    tasks = ragged_tasks()
    fixed = Episode(*(torch.stack(f) for f in zip(tasks[0], tasks[2])))  # two 3-way tasks, a 6-output head
    for batch, parts in ((fixed, [tasks[0], tasks[2]]), (RaggedEpisode.from_tasks(tasks), tasks)):
        with torch.inference_mode():
            adapted, _ = learner.run_meta_batch(batch, training=False, trajectory="all_and_initial")
        for i, t in enumerate(parts):
            logits, support_loss = direct_proto_logits(learner.backbone, t)
            m, n = logits.shape
            assert_scaled_close(adapted.outputs[i, 0, :m, :n], logits.detach(), f"task {i}: logits at step 0", 1e-12)
            # support losses are kept in float32
            assert_scaled_close(adapted.losses[i, 0], support_loss.detach().float(), f"task {i}: first support loss", 1e-6)
    with torch.no_grad():  # the head's own parameters are unused
        learner.backbone.head.weight.normal_()
        learner.backbone.head.bias.normal_()
    with torch.inference_mode():
        again, _ = learner.run_meta_batch(fixed, training=False, trajectory="all_and_initial")
    direct = torch.stack([direct_proto_logits(learner.backbone, t)[0] for t in (tasks[0], tasks[2])])
    assert_scaled_close(again.outputs[:, 0], direct.detach(), "head changed: step 0", 1e-12)


def test_proto_maml_freezes_the_unused_head_and_trains_everything_else():
    learner = MAML(MLP(4, (8,), 6), inner_lr=0.3, learn_inner_lr=True, head_init="prototypes").double()
    assert not learner.backbone.head.weight.requires_grad and not learner.backbone.head.bias.requires_grad
    assert "head.weight" in learner.adapted_names and "head__weight" in learner.inner_lrs  # adapted, its rate learned
    loss = learner.training_step(RaggedEpisode.from_tasks(ragged_tasks()), 0)
    grads = torch.autograd.grad(loss, trained(learner))  # no allow_unused: DDP finds no unused parameter either
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed"])
def test_a_trainer_fits_and_validates_on_ragged_meta_batches_at_every_precision(precision):
    batches = [RaggedEpisode.from_tasks(ragged_tasks(dtype=torch.float32)[i:i + 3]) for i in range(3)]

    class Data(L.LightningDataModule):
        variable_episodes = VariableEpisodes(min_way=2, max_way=6, max_support=10)

        def train_dataloader(self):
            return DataLoader(batches, batch_size=None)

        def val_dataloader(self):
            return DataLoader(batches[:2], batch_size=None)

    torch.manual_seed(0)
    learner = MAML(MLP(4, (8,), 6), inner_lr=0.3, inner_steps=2, head_init="prototypes")
    trainer = L.Trainer(max_epochs=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    before = [p.detach().clone() for p in trained(learner)]
    trainer.fit(learner, Data())
    assert learner.hparams.variable_ways  # read from the data module at setup
    assert 0 <= float(trainer.callback_metrics["val/acc"]) <= 1 and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(before, trained(learner)))


def test_variable_episodes_of_the_data_module_train_and_validate_proto_maml():

    from lightning_meta import EpisodicDataModule

    rules = VariableEpisodes(min_way=2, max_way=5, max_query=3, max_support=15, max_support_per_class=4)
    data = EpisodicDataModule(train=blobs(seed=0), val=blobs(seed=1), n_way=None, n_shot=None, n_query=None,
                              meta_batch_size=3, train_episodes=6, val_episodes=3, variable_episodes=rules)
    learner = MAML(MLP(8, (16,), 5), inner_lr=0.3, head_init="prototypes")
    run = trainer(max_epochs=1)
    run.fit(learner, data)
    assert learner.hparams.variable_ways and 0 <= float(run.callback_metrics["val/acc"]) <= 1


def test_float16_autocast_trains_a_ragged_meta_batch_as_float32_does_within_half_precision():
    # Lightning's 16-mixed becomes bf16-mixed on a CPU: float16 autocast directly, with the inner loss scale
    batch = RaggedEpisode.from_tasks(ragged_tasks(dtype=torch.float32))
    results = []
    for half in (False, True):
        torch.manual_seed(0)
        learner = MAML(MLP(4, (8,), 6), inner_lr=0.3, inner_steps=2, head_init="prototypes", inner_loss_scale=1024.0,
                       task_parallel="loop")
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            loss = learner.training_step(batch, 0)
        results.append((loss, torch.cat([g.flatten() for g in torch.autograd.grad(loss, trained(learner))])))
    (loss32, g32), (loss16, g16) = results
    assert torch.isfinite(g16).all()
    assert abs(loss16.item() - loss32.item()) < 1e-2 * loss32.item()
    assert (g16 - g32).norm() < 5e-2 * g32.norm()


def test_a_diverged_ragged_task_is_nan_in_its_own_cells_and_counted_not_averaged():
    tasks = ragged_tasks()
    tasks[1] = tasks[1]._replace(support_x=tasks[1].support_x * 1e200)
    batch = RaggedEpisode.from_tasks(tasks)
    learner = build("maml", "vmap").eval()
    with torch.inference_mode():
        logits = learner(batch)
    own = batch.mask()[:, :, None] & batch.way_mask()[:, None, :]
    assert torch.isnan(logits[1][own[1]]).all() and torch.isneginf(logits[1][~own[1]]).all()
    assert batch.task_finite(logits).tolist() == [True, False, True, True, True]


# ---------------------------------------------------------------------------------------------- errors
class HeadFirst(nn.Module):
    """The last registered nn.Linear is not the output layer."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 6)
        self.body = nn.Linear(4, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_head_narrower_than_max_way_is_refused_at_setup():
    class Data(L.LightningDataModule):
        variable_episodes = VariableEpisodes(min_way=5, max_way=10)

        def train_dataloader(self):
            return DataLoader([RaggedEpisode.from_tasks(ragged_tasks(dtype=torch.float32))], batch_size=None)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ValueError, match=r"up to 10 ways \(max_way=10\), but the model's head has 6 outputs: build the "
                                         r"backbone with out_features=10 \(e.g. Conv4\(out_features=10\)"):
        trainer.fit(MAML(MLP(4, (8,), 6), inner_lr=0.3), Data())


def test_a_ragged_task_wider_than_the_head_is_refused():
    with pytest.raises(ValueError, match=r"Task 1 of the ragged meta-batch has 5 ways but the model's head has 4 "
                                         r"outputs.*out_features=5"):
        MAML(MLP(4, (8,), 4), inner_lr=0.3).double().training_step(RaggedEpisode.from_tasks(ragged_tasks()), 0)


def test_variable_ways_need_the_last_linear_to_be_the_output_layer():
    with pytest.raises(ValueError, match=r"first N outputs of the head, the last nn.Linear of the adapted HeadFirst, "
                                         r"but its outputs .* are not that layer's"):
        MAML(HeadFirst(), inner_lr=0.3).double().training_step(RaggedEpisode.from_tasks(ragged_tasks()), 0)


def test_proto_maml_without_a_linear_head_or_its_bias_or_with_the_zeroing_trick_is_refused():
    with pytest.raises(ValueError, match=r"head_init='prototypes' starts the head \(the last nn.Linear\).*the adapted "
                                         r"Sequential has no nn.Linear"):
        MAML(nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten()), head_init="prototypes")
    with pytest.raises(ValueError, match=r"has no bias: build it with bias=True"):
        MAML(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)), head_init="prototypes")
    with pytest.raises(ValueError, match=r"zero_head=True and head_init='prototypes' both choose"):
        MAML(MLP(4, (8,), 3), zero_head=True, head_init="prototypes")
    with pytest.raises(ValueError, match=r"Expected `head_init` to be one of"):
        MAML(MLP(4, (8,), 3), head_init="zeros")
    regression = Episode(torch.randn(2, 5, 1), torch.randn(2, 5), torch.randn(2, 3, 1), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"head_init='prototypes'.*needs classification episodes"):
        MAML(MLP(1, (8,), 1), head_init="prototypes").training_step(regression, 0)
