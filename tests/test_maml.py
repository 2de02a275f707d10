import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import blob_data, episode, sine_data, trainer
from torch.func import functional_call

from conftest import require_learn2learn
from lightning_meta import ANIL, MAML, Episode, EpisodicDataModule, MetaSGD
from lightning_meta.functional import inner_adapt, scaled_grad
from lightning_meta.models import MLP, Conv4


def reference_meta_grads(net, batch, lr, steps, first_order):
    """MAML meta-gradient in plain autograd, written from the paper (one task at a time)."""
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    total = 0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.task(t)
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, dict(zip(names, fast)), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        total = total + F.cross_entropy(functional_call(net, dict(zip(names, fast)), (qx,)), qy)
    return torch.autograd.grad(total / batch.num_tasks, params)


def our_meta_grads(model, batch):
    model.train()
    loss = model.training_step(batch, 0)
    return torch.autograd.grad(loss, list(model.backbone.parameters()))


def assert_grads_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("task_parallel", ["vmap", "loop"])
def test_meta_gradients_equal_a_hand_written_autograd_reference(first_order, steps, task_parallel):
    torch.manual_seed(0)
    net = MLP(8, (16, 16), 3)
    reference = reference_meta_grads(copy.deepcopy(net), episode(b=3), 0.3, steps, first_order)
    model = MAML(net, inner_lr=0.3, inner_steps=steps, first_order=first_order, task_parallel=task_parallel)
    assert_grads_close(our_meta_grads(model, episode(b=3)), reference)


def test_second_order_differs_from_first_order():
    torch.manual_seed(0)
    net = MLP(8, (16,), 3)
    second = our_meta_grads(MAML(copy.deepcopy(net), inner_lr=0.5, inner_steps=2), episode())
    first = our_meta_grads(MAML(copy.deepcopy(net), inner_lr=0.5, inner_steps=2, first_order=True), episode())
    assert max((a - b).abs().max().item() for a, b in zip(second, first)) > 1e-4


def test_transductive_batch_norm_matches_the_reference_with_per_task_batch_statistics():
    # the MAML paper's batch norm: every forward pass (support, queries) with its own batch statistics (the default,
    # queries with the support's statistics, is checked against its own reference in test_engines.py)
    torch.manual_seed(0)
    net = Conv4(hidden=4, out_features=3)
    ep = Episode(torch.randn(2, 6, 1, 28, 28), torch.arange(3).repeat(2, 2), torch.randn(2, 9, 1, 28, 28),
                 torch.arange(3).repeat(2, 3))
    ref_net = copy.deepcopy(net).train()  # running stats on, train mode: BN normalises with batch statistics
    reference = reference_meta_grads(ref_net, ep, 0.4, 1, False)
    model = MAML(net, inner_lr=0.4, inner_steps=1, batch_norm="transductive")
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert_grads_close(our_meta_grads(model, ep), reference)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_meta_gradients_equal_learn2learn(first_order, steps):
    l2l = require_learn2learn()
    torch.manual_seed(0)
    net = MLP(8, (16, 16), 3)
    ep = episode(b=3)
    theirs = l2l.algorithms.MAML(copy.deepcopy(net), lr=0.3, first_order=first_order)
    total = 0
    for t in range(ep.num_tasks):
        sx, sy, qx, qy = ep.task(t)
        learner = theirs.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        total = total + F.cross_entropy(learner(qx), qy)
    (total / ep.num_tasks).backward()
    model = MAML(net, inner_lr=0.3, inner_steps=steps, first_order=first_order)
    assert_grads_close(our_meta_grads(model, ep), [p.grad for p in theirs.module.parameters()])


def test_inner_loop_never_touches_grad_and_each_parameter_accumulates_once():
    model = MAML(MLP(8, (16,), 3), inner_lr=0.3, inner_steps=3)
    counts = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
    loss = model.training_step(episode(), 0)
    assert all(p.grad is None for p in model.parameters()) and not counts
    loss.backward()
    assert counts == {name: 1 for name, _ in model.named_parameters()}


def test_validation_and_test_adapt_with_gradients_under_default_inference_mode():
    model = MAML(MLP(8, (16,), 3), inner_lr=0.5, inner_steps=1, eval_inner_steps=3)
    t = trainer(max_epochs=2)
    # Lightning's default: evaluation runs under torch.inference_mode
    assert t.test_loop.inference_mode and t.validate_loop.inference_mode
    dm = blob_data(train_episodes=20)
    t.fit(model, dm)
    assert "val/acc" in t.callback_metrics
    res = t.test(model, dm, verbose=False)[0]
    assert res["test/acc"] > 0.5
    # evaluation really adapts: the adapted outputs differ from the unadapted network's
    batch = next(iter(dm.test_dataloader()))
    model.eval()
    with torch.inference_mode():
        adapted = model(batch)
        plain = model.backbone(batch.query_x.flatten(0, 1)).view_as(adapted)
    assert not adapted.requires_grad and (adapted - plain).abs().max() > 1e-3


def test_adapt_predictor_improves_on_the_support_set():
    torch.manual_seed(0)
    model = MAML(MLP(8, (16,), 3), inner_lr=0.5, inner_steps=1, eval_inner_steps=10)
    ep = episode(b=1)
    before = F.cross_entropy(model.backbone(ep.support_x[0]), ep.support_y[0])
    predictor = model.adapt(ep.support_x[0], ep.support_y[0])
    after = F.cross_entropy(predictor(ep.support_x[0]), ep.support_y[0])
    assert after < 0.5 * before


def test_vmap_and_loop_give_the_same_outputs_and_tasks_do_not_leak_into_each_other():
    torch.manual_seed(0)
    net = MLP(8, (16,), 3)
    ep = episode(b=4)
    a = MAML(copy.deepcopy(net), inner_lr=0.3, task_parallel="vmap")(ep)
    b = MAML(copy.deepcopy(net), inner_lr=0.3, task_parallel="loop")(ep)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    alone = MAML(copy.deepcopy(net), inner_lr=0.3)(Episode(*(t[:1] for t in ep)))
    torch.testing.assert_close(a[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [MAML, MetaSGD, ANIL])
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_linear_chain_matches_generic_vmap_in_outputs_and_meta_gradients(cls, first_order):
    # the fast path for linear/activation chains (one batched matmul per layer) must give vmap's numbers
    torch.manual_seed(0)
    net = MLP(8, (16, 16), 3)
    ep = episode(b=4)
    fast = cls(copy.deepcopy(net), inner_lr=0.3, inner_steps=2, first_order=first_order, task_parallel="vmap")
    generic = cls(copy.deepcopy(net), inner_lr=0.3, inner_steps=2, first_order=first_order, task_parallel="vmap")
    assert fast.engine.network(fast.adapted_module()).chain is not None
    generic.engine.batched_chain = False  # torch.func.vmap over functional_call
    torch.testing.assert_close(fast(ep), generic(ep), atol=1e-6, rtol=1e-5)
    fast.train(), generic.train()
    assert_grads_close(our_meta_grads(fast, ep), our_meta_grads(generic, ep), atol=1e-6)
    conv = MAML(Conv4(out_features=5), inner_lr=0.4)
    assert conv.engine.network(conv.backbone).chain is None  # convolutions: generic path


def test_auto_picks_vmap_without_convolutions_and_a_loop_with_them():
    assert MAML(MLP(1, (40, 40), 1), inner_lr=0.01).use_vmap
    assert not MAML(Conv4(out_features=5), inner_lr=0.4).use_vmap
    assert MAML(Conv4(out_features=5), inner_lr=0.4, task_parallel="vmap").use_vmap
    assert ANIL(Conv4(out_features=5), inner_lr=0.4).use_vmap  # only the linear head is adapted
    on_gpu = MAML(Conv4(out_features=5), inner_lr=0.4)  # on a GPU vmap wins for convolutions too
    module = on_gpu.adapted_module()
    assert on_gpu.engine.use_vmap(module, torch.device("cuda", 0)) and not on_gpu.engine.use_vmap(module, torch.device("cpu"))
    assert not MAML(Conv4(out_features=5), inner_lr=0.4, task_parallel="loop").use_vmap


@pytest.mark.parametrize(("dtype", "min_cosine"), [(torch.bfloat16, 0.95), (torch.float16, 0.99)])
@pytest.mark.parametrize("task_parallel", ["vmap", "loop"])
def test_batch_norm_maml_meta_gradients_are_finite_and_agree_under_autocast(dtype, min_cosine, task_parallel):
    # float16 batch norm's double backward returns NaN, and vmap's batch-norm rule rejects a half input with float
    # weights: inside the inner loop batch norm runs in float32 while convolutions stay in reduced precision.
    # 5-shot: with 1-shot batch norm divides by the spread of 3 images and the meta-gradient is ill-conditioned
    # (a 1e-3 relative change of the float32 inputs alone moves it to cosine 0.91-0.99).
    from lightning_meta.data import SyntheticGlyphs

    dm = EpisodicDataModule(train=SyntheticGlyphs("train"), n_way=3, n_shot=5, n_query=5, meta_batch_size=2,
                            train_episodes=2, seed=0)
    dm.setup("fit")
    ep = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=16, out_features=3), inner_lr=0.4, inner_steps=2, task_parallel=task_parallel)
    full = torch.cat([g.flatten() for g in our_meta_grads(model, ep)])
    for scale in (1.0, 256.0):  # the outer loss scaled as GradScaler does
        with torch.autocast("cpu", dtype=dtype):
            loss = model.training_step(ep, 0)
        model.zero_grad()
        (loss * scale).backward()
        half = torch.cat([p.grad.flatten() / scale for p in model.parameters()])
        assert torch.isfinite(half).all()
        assert F.cosine_similarity(full, half, dim=0) > min_cosine
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the float32 hooks are gone afterwards
        assert norm(torch.randn(2, 16, 4, 4).bfloat16()).dtype == torch.bfloat16


def test_bf16_inner_loop_meta_gradients_agree_with_float32():
    torch.manual_seed(0)
    model = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=2)
    dm = sine_data(meta_batch_size=25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    full = torch.cat([g.flatten() for g in our_meta_grads(model, batch)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.cat([g.flatten() for g in our_meta_grads(model, batch)])
    assert half.dtype == torch.float32 and F.cosine_similarity(full, half, dim=0) > 0.99


def test_sinusoid_regression_converges_in_bf16_mixed_precision():
    torch.manual_seed(0)
    model = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=1, lr=3e-3)
    dm = sine_data(meta_batch_size=25, train_episodes=25 * 300, test_episodes=100)
    before = trainer().test(model, dm, verbose=False)[0]["test/mse"]
    t = trainer(max_epochs=1, precision="bf16-mixed", limit_val_batches=0)
    t.fit(model, dm)
    after = t.test(model, dm, verbose=False)[0]["test/mse"]
    assert after < 0.6 * before


def test_loss_scaling_keeps_small_float16_inner_gradients_from_underflowing():
    w = {"w": torch.ones(4, dtype=torch.float16)}
    x = torch.full((4,), 1e-4, dtype=torch.float16)

    def loss(p):  # gradient 1e-4 * 1e-4 = 1e-8, below float16's smallest subnormal (6e-8)
        return (p["w"] * x).sum() * 1e-4

    unscaled, _ = scaled_grad(loss, w)
    scaled, _ = scaled_grad(loss, w, scale=1024.0)
    assert unscaled["w"].abs().max() == 0
    torch.testing.assert_close(scaled["w"], torch.full((4,), 1e-8), rtol=0.05, atol=0)
    # and through the inner loop: the adapted weights move only when the loss is scaled
    fwd = lambda p, xs: (p["w"] * xs).sum(-1, keepdim=True) * 1e-4  # noqa: E731
    sx, sy = x.expand(3, 4), torch.ones(3, dtype=torch.float16)
    moved = [inner_adapt(fwd, w, sx, sy, 1, lambda s: {"w": 1e6}, True, scale)[0][-1]["w"] for scale in (1.0, 1024.0)]
    assert torch.equal(moved[0], w["w"]) and (moved[1] != w["w"]).all()


def test_maml_uses_float16_loss_scale_automatically_only_under_16_bit_precision():
    model = MAML(MLP(1, (4,), 1), inner_lr=0.01)
    assert model.inner_scale == 1.0
    assert MAML(MLP(1, (4,), 1), inner_lr=0.01, inner_loss_scale=256.0).inner_scale == 256.0


def test_non_finite_inner_loss_names_the_step_and_task():
    model = MAML(MLP(8, (16,), 3), inner_lr=1e30, inner_steps=3)
    with pytest.raises(FloatingPointError, match=r"non-finite at inner step \d of task \d in the meta-batch"):
        model.training_step(episode(), 0)


@pytest.mark.parametrize("kwargs,message", [
    ({"inner_lr": 0.0}, r"Expected `inner_lr` to be a positive number, but got 0.0"),
    ({"inner_lr": -1}, r"Expected `inner_lr` to be a positive number"),
    ({"inner_steps": 0}, r"Expected `inner_steps` to be an integer >= 1, but got 0"),
    ({"inner_steps": 1.5}, r"Expected `inner_steps` to be an integer >= 1, but got 1.5"),
    ({"eval_inner_steps": 0}, r"Expected `eval_inner_steps` to be an integer >= 1"),
    ({"task_parallel": "threads"}, r"Expected `task_parallel` to be one of"),
])
def test_invalid_inner_loop_settings_are_rejected_at_construction(kwargs, message):
    args = {"inner_lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        MAML(MLP(8, (4,), 3), **args)


def test_anil_adapts_only_the_head_and_runs_the_body_on_support_and_queries_outside_the_inner_loop():
    net = MLP(8, (16,), 3)
    calls = []
    net.features.register_forward_hook(lambda *a: calls.append(1))
    model = ANIL(net, inner_lr=0.5, inner_steps=3)
    assert model.adapted_names == ["weight", "bias"]
    loss = model.training_step(episode(b=4), 0)
    assert len(calls) == 8  # per task one body call for the support set and one for the queries, none in the inner steps
    grads = torch.autograd.grad(loss, list(net.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)  # the body still learns through the adapted head
    with pytest.raises(ValueError, match="ANIL adapts only the head"):
        ANIL(torch.nn.Linear(8, 3), inner_lr=0.1)


def test_anil_body_in_one_vmap_call_equals_the_per_task_loop():
    # the GPU path (one vmapped body call; task_parallel="auto" there) against the CPU path (a loop over tasks): the
    # same batch-norm statistics per task, so the same outputs and meta-gradients; under bf16 autocast both run and
    # stay near float32
    torch.manual_seed(0)
    net = Conv4(hidden=8, out_features=3)
    batch = Episode(torch.randn(4, 6, 1, 28, 28), torch.arange(3).repeat(4, 2), torch.randn(4, 6, 1, 28, 28),
                    torch.arange(3).repeat(4, 2))

    def run(body_vmap, dtype=None):
        model = ANIL(copy.deepcopy(net), inner_lr=0.4, inner_steps=2, task_parallel="vmap" if body_vmap else "loop")
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(batch, 0)
        return loss, torch.autograd.grad(loss, list(model.backbone.parameters()))

    (a, grads_a), (b, grads_b) = run(True), run(False)
    torch.testing.assert_close(a, b)
    assert_grads_close(grads_a, grads_b)
    full = torch.cat([g.flatten() for g in grads_b])
    for body_vmap in (True, False):  # bf16 convolutions in the loop give cosine 0.98 here; under CPU autocast vmap
        _, grads = run(body_vmap, torch.bfloat16)  # keeps more in float32 (pytorch#192617), about 1.0
        assert F.cosine_similarity(torch.cat([g.flatten() for g in grads]), full, dim=0) > 0.95


def test_metasgd_learns_a_rate_per_parameter_element():
    model = MetaSGD(MLP(8, (16,), 3), inner_lr=0.2)
    assert model.inner_lrs["head__weight"].shape == (3, 16)
    loss = model.training_step(episode(), 0)
    g = torch.autograd.grad(loss, list(model.inner_lrs.values()))
    assert all(x.abs().sum() > 0 for x in g)


def test_maml_plus_plus_per_step_rates_multi_step_loss_and_order_annealing():
    model = MAML(MLP(8, (16,), 3), inner_lr=0.2, inner_steps=3, per_step_lr=True, multi_step_loss=True,
                 msl_epochs=4, first_order_epochs=1)
    assert model.inner_lrs["head__weight"].shape == (3,)
    w0 = model.msl_weights()
    torch.testing.assert_close(w0, torch.full((3,), 1 / 3))
    t = trainer(max_epochs=3, limit_val_batches=1)
    t.fit(model, blob_data())
    w = model.msl_weights()
    assert w.sum().item() == pytest.approx(1.0) and w[-1] > w[0]
    assert not model.first_order_now()  # epoch 3 >= first_order_epochs
    assert model.inner_lrs["head__weight"].ne(0.2).any()  # the per-step rates were learned


def test_metasgd_with_per_step_rates_learns_one_rate_per_element_and_step():
    # before: per_step_lr=True was accepted and ignored by MetaSGD (one rate per element for every step)
    model = MetaSGD(MLP(8, (16,), 3), inner_lr=0.2, inner_steps=2, per_step_lr=True)
    assert model.inner_lrs["head__weight"].shape == (2, 3, 16)
    loss = model.training_step(episode(), 0)
    grads = torch.autograd.grad(loss, list(model.inner_lrs.values()))
    assert all(g[0].abs().sum() > 0 and g[1].abs().sum() > 0 for g in grads)  # each step's rates get a gradient
    assert all(not torch.allclose(g[0], g[1]) for g in grads)


def test_per_step_rates_are_refused_for_steps_they_did_not_learn():
    with pytest.raises(ValueError, match=r"per_step_lr=True learns one inner rate per step for inner_steps=2 steps, so "
                                         r"eval_inner_steps=5 would take steps that have no learned rate"):
        MAML(MLP(8, (16,), 3), inner_lr=0.2, inner_steps=2, eval_inner_steps=5, per_step_lr=True)
    model = MAML(MLP(8, (16,), 3), inner_lr=0.2, inner_steps=2, per_step_lr=True)
    with pytest.raises(ValueError, match=r"learned rates for 2 inner steps; step 3 has none"):
        model.step_outputs(episode(), steps=3)
    assert model.step_outputs(episode(), steps=2).shape[1] == 3


def test_reference_mlp_initialization_follows_the_maml_authors_code():
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1, init="reference")
    weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w.abs().max() <= 0.02 for w in weights) and all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    assert 0.007 < torch.cat([w.flatten() for w in weights]).std() < 0.011  # std 0.01 truncated at 2 std: 0.0088
    assert MLP(1, (40, 40), 1).features[1].weight.abs().max() > 0.1  # PyTorch's default is far wider
    with pytest.raises(ValueError, match=r"Expected `init` to be one of \('torch', 'reference'\), but got 'xavier'"):
        MLP(1, (40,), 1, init="xavier")


def test_vmap_and_loop_agree_for_batch_norm_convnets_in_outputs_and_meta_gradients():
    # on a GPU `auto` runs convnets under vmap (one autograd call per inner step for all tasks); on a CPU as a loop
    torch.manual_seed(0)
    net = Conv4(hidden=8, out_features=3)
    ep = Episode(torch.rand(3, 6, 1, 28, 28), torch.arange(3).repeat_interleave(2).repeat(3, 1),
                 torch.rand(3, 6, 1, 28, 28), torch.arange(3).repeat_interleave(2).repeat(3, 1))
    models = [MAML(copy.deepcopy(net), inner_lr=0.4, inner_steps=2, task_parallel=tp) for tp in ("vmap", "loop")]
    torch.testing.assert_close(models[0](ep), models[1](ep), atol=1e-5, rtol=1e-4)
    assert_grads_close(our_meta_grads(models[0], ep), our_meta_grads(models[1], ep), atol=1e-5)


def _overflowing_metasgd(**kwargs):
    """Task 1's support gradient for the hidden bias is finite (22) but its learned rate (1e38) overflows the update
    to -inf; behind the ReLU the query outputs stay finite, so only a check of the adapted parameters catches it.
    Task 0's support target makes its gradient exactly zero."""
    model = MetaSGD(MLP(1, (1,), 1), inner_lr=1.0, **kwargs)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.fill_(1.0)
        for name, rate in model.inner_lrs.items():
            rate.fill_(1e38 if name == "features__1__bias" else 0.0)
    sy = torch.tensor([[2.0] * 3, [-10.0] * 3])
    return model, Episode(torch.zeros(2, 3, 1), sy, torch.linspace(-1, 1, 8).view(2, 4, 1), torch.zeros(2, 4))


@pytest.mark.parametrize("task_parallel", ["vmap", "loop"])
def test_an_overflowing_inner_update_is_caught_even_when_the_query_outputs_stay_finite(task_parallel, monkeypatch):
    model, ep = _overflowing_metasgd(task_parallel=task_parallel)
    with pytest.raises(FloatingPointError, match=r"non-finite at inner step 0 of task 1 in the meta-batch \(loss 144"):
        model.forward_episode(ep)
    monkeypatch.setattr(MAML, "check_inner_loop", lambda self, adapted, evaluating=False: None)
    assert torch.isfinite(model.forward_episode(ep)).all()  # what a check of the outputs alone would have let pass


@pytest.mark.parametrize("kwargs", [{}, {"first_order": True, "task_parallel": "loop"}])  # the second streams
def test_skip_mode_skips_a_meta_batch_whose_inner_loop_went_non_finite(kwargs):
    model, ep = _overflowing_metasgd(nonfinite="skip", **kwargs)
    with pytest.warns(UserWarning, match=r"Skipped meta-batch at global step 0: the meta-loss is nan"):
        assert model.training_step(ep, 0) is None


@pytest.mark.parametrize("task_parallel", ["vmap", "loop"])
def test_the_first_non_finite_inner_step_and_task_are_named_exactly(task_parallel):
    # linear regression; task 2's inputs are 1e10: its first step is finite (loss ~1e20, weight -> ~-2e17 w) and
    # its second support loss (~4e54 w^2) overflows float32
    torch.manual_seed(0)
    model = MAML(MLP(1, (), 1), inner_lr=1e-3, inner_steps=3, task_parallel=task_parallel)
    sx = torch.rand(3, 5, 1)
    sx[2] *= 1e10
    ep = Episode(sx, torch.rand(3, 5), torch.rand(3, 4, 1), torch.rand(3, 4))
    with pytest.raises(FloatingPointError, match=r"non-finite at inner step 1 of task 2 in the meta-batch"):
        model.training_step(ep, 0)


def test_huge_but_finite_values_are_not_mistaken_for_non_finite():
    # the quick finiteness checks sum whole tensors: 3e38 + 3e38 overflows that sum, and the exact check must clear it
    model = MAML(MLP(1, (4,), 1), inner_lr=1e-3, task_parallel="vmap")
    sx = torch.full((2, 3, 1), 3e38)
    model.check_episode(Episode(sx, torch.zeros(2, 3), torch.zeros(2, 2, 1), torch.zeros(2, 2)))  # no error
    with torch.no_grad():  # hidden units all 0, so the huge head weights do not reach the outputs or the losses
        for p in model.backbone.features.parameters():
            p.zero_()
        model.backbone.head.weight.fill_(3e38)
    adapted, _ = model.run_meta_batch(Episode(torch.zeros(2, 3, 1), torch.zeros(2, 3), torch.zeros(2, 2, 1),
                                              torch.zeros(2, 2)), training=False)
    assert torch.isfinite(adapted.losses).all() and adapted.finite.all() and torch.isfinite(adapted.outputs).all()


def _graph_ops(loss):
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("parallel", [{"task_parallel": "loop"}, {"task_parallel": "loop", "task_chunk": 2},
                                      {"task_parallel": "vmap", "task_chunk": 2}])
@pytest.mark.parametrize("cls,kwargs", [
    (MAML, {}),
    (MAML, {"inner_loss_scale": 1024.0}),
    (MAML, {"per_step_lr": True, "multi_step_loss": True, "msl_epochs": 3}),
    (MetaSGD, {}),
])
def test_training_streams_task_by_task_or_chunk_by_chunk_with_the_same_loss_and_meta_gradients(cls, kwargs, parallel,
                                                                                               first_order):
    # each task's (loop) or chunk's (vmap, task_chunk) meta-gradient is taken as soon as it is done and its graph
    # freed; the returned loss carries the summed gradients: the same value and the same gradients (inner rates
    # included) as the whole-batch graph. 5 tasks in chunks of 2: the last chunk is short
    torch.manual_seed(0)
    net, ep = MLP(8, (16, 16), 3), episode(b=5)
    models = [cls(copy.deepcopy(net), inner_lr=0.3, inner_steps=2, first_order=first_order, **parallel, **kwargs,
                  stream_meta_gradients=stream) for stream in (True, False)]
    losses, grads = [], []
    for model in models:
        model.train()
        loss = model.training_step(ep, 0)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    assert models[0].streams and not models[1].streams
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    assert_grads_close(grads[0], grads[1], atol=1e-6)
    streamed_ops = _graph_ops(models[0].training_step(ep, 0))
    assert "ReluBackward0" not in streamed_ops and "ReluBackward0" in _graph_ops(models[1].training_step(ep, 0))


def test_streaming_is_for_training_on_the_task_loop_or_in_vmapped_chunks():
    assert MAML(Conv4(out_features=5), inner_lr=0.3).streams  # auto: the loop on a CPU
    assert not MAML(MLP(8, (16,), 3), inner_lr=0.3, task_parallel="vmap").streams
    assert MAML(MLP(8, (16,), 3), inner_lr=0.3, task_parallel="vmap", task_chunk=4).streams
    assert not ANIL(MLP(8, (16,), 3), inner_lr=0.3, task_parallel="loop").streams
    with pytest.raises(ValueError, match=r"Expected `task_chunk` to be an integer >= 1, but got 0"):
        MAML(MLP(8, (16,), 3), inner_lr=0.3, task_chunk=0)


def test_convolutional_maml_in_vmapped_chunks_equals_the_whole_meta_batch():
    # the generic vmap path (batch norm per task inside each chunk), second order
    torch.manual_seed(0)
    net = Conv4(hidden=8, out_features=3)
    batch = Episode(torch.randn(5, 6, 1, 28, 28), torch.arange(3).repeat(5, 2), torch.randn(5, 6, 1, 28, 28),
                    torch.arange(3).repeat(5, 2))
    grads = []
    for chunk in (2, None):
        model = MAML(copy.deepcopy(net), inner_lr=0.4, task_parallel="vmap", task_chunk=chunk)
        grads.append(torch.autograd.grad(model.training_step(batch, 0), list(model.backbone.parameters())))
    assert_grads_close(grads[0], grads[1])


def test_the_streamed_loss_keeps_its_value_when_a_gradient_overflows_so_the_gradient_scaler_can_skip_the_step():
    from lightning_meta.functional import Streamed

    p = torch.ones(3, requires_grad=True)
    loss = Streamed(torch.tensor(2.0), [(p, torch.tensor([1.0, float("inf"), 0.0]))]).loss()
    assert loss.item() == 2.0  # (p - p.detach()) * g would be NaN here, and the base class would stop training
    (loss * 4).backward()  # the scaler's scale multiplies through; the inf reaches .grad, where the scaler sees it
    assert p.grad.tolist() == [4.0, float("inf"), 0.0]


def test_task_by_task_meta_gradients_take_the_gradient_scalers_scale_under_16_mixed():
    from types import SimpleNamespace

    model = MAML(MLP(8, (16,), 3), inner_lr=0.3, task_parallel="loop")
    assert model.meta_gradient_scale == 1.0
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    model.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), precision="16-mixed")
    assert model.meta_gradient_scale == 512.0 and model.inner_scale == 1024.0


def test_zero_head_starts_every_task_at_zero_so_one_step_is_a_prototype_classifier():
    # Ye & Chao's zeroing trick: with the head at zero, one inner step of cross-entropy gives
    # W = lr/S * sum_i (onehot_i - 1/N) z_i^T and b = lr/S * sum_i (onehot_i - 1/N): checked against that formula
    from lightning_meta.models import MLP

    torch.manual_seed(0)
    maml = MAML(MLP(4, (8,), out_features=3), inner_lr=0.5, inner_steps=1, zero_head=True)
    assert not maml.backbone.head.weight.requires_grad and maml.backbone.head.weight.abs().sum() == 0
    sx, sy = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    qx = torch.randn(5, 4)
    z_s, z_q = maml.backbone.features(sx), maml.backbone.features(qx)
    coef = (torch.nn.functional.one_hot(sy, 3).float() - 1 / 3) * 0.5 / 6
    expected = z_q @ (coef.T @ z_s).T + coef.sum(0)
    torch.testing.assert_close(maml.adapt(sx, sy)(qx), expected.detach(), atol=1e-6, rtol=1e-5)
    # the body is meta-trained through that step; the head is not trained
    episode = Episode(sx[None], sy[None], qx[None], torch.tensor([[0, 1, 2, 0, 1]]))
    maml.training_step(episode, 0).backward()
    assert maml.backbone.features[1].weight.grad.abs().sum() > 0 and maml.backbone.head.weight.grad is None
