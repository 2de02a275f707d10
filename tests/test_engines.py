"""Differential test of every MAML engine: for a family of small networks (MLP; a layer applied twice; weights tied
between two layers; a convnet with batch norm; dropout) and every variant (MAML with 1 and 3 inner steps, first order,
learned per-layer rates, MAML++ per-step rates and multi-step loss, Meta-SGD, ANIL), each engine the learner can
run -- the task loop, the loop in task chunks, vmap (the hand-written batched chain where the network is a
linear/activation chain) and vmap in chunks with streamed meta-gradients -- gives the same meta-loss, meta-gradients
(initialization and learned rates), evaluation outputs, per-step outputs and `adapt()` predictions as a reference
built on learn2learn's own `clone_module`/`update_module` (its MAML's machinery), in float64, each tensor to 1e-9 of
its own scale (agreement is ~1e-15: an error confined to small gradient elements cannot hide).

The cases around the edges each engine has: a meta-batch of 5 in chunks of 2 (an uneven last chunk), more inner
steps in evaluation than in training, the zeroing trick, an inner loss scale (unscaled in float64), inputs with two
feature dimensions (a sequence through linear layers), an in-place activation after one whose output is kept, and
regression targets through the hand-written chain; one small case with inductor's compiled kernels.

A new engine or fast path joins `ENGINES` to exist; the compiled inner loop (`compile=...`) is one. Compiling costs
5 to 20 s of tracing per case where the eager engines take well under one, so the compiled engine runs on every
variant with the MLP (in uneven chunks) and on every network with 3 inner steps of MAML (`compiled_too`): every
option of the compiled core, and every kind of layer through it, against the reference; the eager engines run on
every pair."""

import pytest
import torch
from torch import nn

from conftest import require_learn2learn
from lightning_meta import ANIL, MAML, Episode, MetaSGD
from lightning_meta.models import MLP, Conv4

ENGINES = [dict(task_parallel="loop"), dict(task_parallel="loop", task_chunk=2), dict(task_parallel="vmap"),
           dict(task_parallel="vmap", task_chunk=2),
           # compiled: each chunk's whole inner loop captured as one graph (dynamo + AOTAutograd, whose backward is
           # the meta-gradient), vmapped, streamed, run by the aot_eager backend; the compiled one-task loop and
           # inductor's kernels are compared with eager in test_compile
           dict(task_parallel="vmap", task_chunk=2, compile={"backend": "aot_eager"})]
SCALE_TOL = 1e-9  # of each tensor's largest magnitude (float64)


def assert_scaled_close(got, want, what="", tol=SCALE_TOL, zero=0.0):
    """``got`` equals ``want`` to ``tol`` of ``want``'s largest magnitude, element by element (a fixed absolute
    tolerance would let an error confined to small elements pass). ``zero``: the scale below which a tensor counts as
    a cancellation residue (a bias before batch norm has a true gradient of 0, computed as 1e-17 to 1e-6 by
    different but equally exact sums): its tolerance is then ``tol`` of ``zero`` (1e-13 of the largest gradient)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = max(want.abs().max().item(), zero, 1e-300)
    error = (got - want).abs().max().item()
    assert error <= tol * scale, f"{what}: {error:.3g} apart at scale {scale:.3g} (tolerance {tol} of it)"


class Twice(nn.Module):
    """One hidden layer applied twice (shared weights inside one forward pass); not a chain: vmap runs it."""

    def __init__(self):
        super().__init__()
        self.inp, self.hid, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.hid(torch.tanh(self.hid(h)))))


def repeated_layer():
    """A linear/activation chain (the batched chain's ground) with one module registered twice."""
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 3))


def tied_layers():
    """Two modules sharing one weight tensor (their biases are their own)."""
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), a, nn.Tanh(), b, nn.Tanh(), nn.Linear(8, 3))


def dropout_mlp():
    """Dropout before the head: evaluation and adapt() must turn it off (the reference runs in eval mode)."""
    net = MLP(4, (8, 8), 3)
    net.features = nn.Sequential(*net.features, nn.Dropout(0.5))
    return net


def sequence(bias=True):
    """Inputs ``[n, 3, 4]`` per task (a sequence of 3 steps of 4 features) through linear layers, then flattened."""
    return nn.Sequential(nn.Linear(4, 8, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 8, 3, bias=bias))


def in_place():
    """An in-place activation after Tanh, whose backward needs its own output."""
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LeakyReLU(0.2, inplace=True), nn.Linear(8, 3))


NETS = {
    "mlp": lambda: MLP(4, (8, 8), 3),
    "sequence": sequence,
    "sequence_no_bias": lambda: sequence(bias=False),
    "in_place": in_place,
    "regression": lambda: MLP(4, (8, 8), 1),  # float targets: MSE through the hand-written chain
    "twice": Twice,
    "repeated": repeated_layer,
    "tied": tied_layers,
    "conv_bn": lambda: Conv4(hidden=4, out_features=3, image_size=16),  # queries normalised by support statistics
    "conv_bn_transductive": lambda: Conv4(hidden=4, out_features=3, image_size=16),  # by their own
    "dropout": dropout_mlp,
}
# in training, dropout masks are random draws whose order differs between engines: dropout is compared in evaluation
TRAIN_NETS = ["mlp", "twice", "repeated", "tied", "conv_bn", "conv_bn_transductive"]
EDGE_NETS = ["sequence", "sequence_no_bias", "in_place", "regression"]  # with a few variants each (below)
VARIANTS = {
    "maml_1step": (MAML, dict(inner_steps=1)),
    "maml_3steps": (MAML, dict(inner_steps=3)),
    "first_order": (MAML, dict(inner_steps=3, first_order=True)),
    "learned_rates": (MAML, dict(inner_steps=2, learn_inner_lr=True)),
    "per_step_rates_msl": (MAML, dict(inner_steps=3, per_step_lr=True, multi_step_loss=True)),
    "metasgd": (MetaSGD, dict(inner_steps=2)),
    "metasgd_first_order": (MetaSGD, dict(inner_steps=2, first_order=True)),
    "anil": (ANIL, dict(inner_steps=3)),
    "metasgd_per_step": (MetaSGD, dict(inner_steps=2, per_step_lr=True)),
    "more_eval_steps": (MAML, dict(inner_steps=1, eval_inner_steps=3)),
    "zero_head": (MAML, dict(inner_steps=2, zero_head=True)),
    "loss_scale": (MAML, dict(inner_steps=2, inner_loss_scale=1024.0)),
}
EDGE_VARIANTS = ["metasgd_per_step", "more_eval_steps", "zero_head", "loss_scale"]  # with a few networks each


def episode(net_name, n=3, q=2, seed=0):
    """A meta-batch of 5 tasks (3 for the convnets, which cost more), so chunks of 2 leave an uneven last chunk;
    2 shots, or 1 for the sequence networks: 3 tasks of 3 support examples each, the case where a broadcasting matmul
    silently paired tasks with examples before."""
    b = 3 if net_name.startswith(("conv_bn", "sequence")) else 5
    k = 1 if net_name.startswith("sequence") else 2
    g = torch.Generator().manual_seed(seed)
    shape = {"conv_bn": (1, 16, 16), "conv_bn_transductive": (1, 16, 16), "sequence": (3, 4),
             "sequence_no_bias": (3, 4)}.get(net_name, (4,))
    x = lambda m: torch.randn(b, m, *shape, generator=g, dtype=torch.float64)  # noqa: E731
    if net_name == "regression":
        y = lambda m: torch.randn(b, m, generator=g, dtype=torch.float64)  # noqa: E731
        return Episode(x(n * k), y(n * k), x(n * q), y(n * q))
    return Episode(x(n * k), torch.arange(n).repeat_interleave(k).repeat(b, 1), x(n * q),
                   torch.arange(n).repeat_interleave(q).repeat(b, 1))


def build(net_name, variant, engine, seed=0):
    cls, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    norm = "transductive" if net_name.endswith("_transductive") else "support"
    learner = cls(NETS[net_name](), inner_lr=0.3, batch_norm=norm, **kwargs, **engine).double()
    return learner


def rate(learner, step, name):
    """The inner rate of parameter ``name`` at ``step``, read from the learner's state by its documented layout:
    ``inner_lrs.<name with __>`` holds ``[inner_steps]`` rates (``per_step_lr``), ``[1]`` (``learn_inner_lr``), the
    parameter's shape (Meta-SGD) or ``[inner_steps, *shape]`` (Meta-SGD with ``per_step_lr``); none: ``inner_lr``."""
    stored = dict(learner.named_parameters()).get("inner_lrs." + name.replace(".", "__"))
    if stored is None:
        return learner.hparams.inner_lr
    if learner.hparams.per_step_lr:
        assert stored.shape[0] == learner.hparams.inner_steps
        return stored[step]
    return stored[0] if stored.shape == (1,) else stored


def queries(module, sx, qx, batch_norm):
    """``module(qx)`` with batch norm as the learner's ``batch_norm`` says. ``"support"``, by a route of its own: a
    first pass over the support set records each batch norm's input statistics, a second pass over the queries
    normalises with them (the library instead runs support and queries as one batch with support statistics)."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if batch_norm == "transductive" or not norms:
        return module(qx)
    stats = {}

    def record(m, args):
        x = args[0]
        stats[m] = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))

    def normalise(m, args, out):
        mean, var = stats[m]
        x = (args[0] - mean[:, None, None]) / torch.sqrt(var[:, None, None] + m.eps)
        return x * m.weight[:, None, None] + m.bias[:, None, None]

    handles = [m.register_forward_pre_hook(record) for m in norms]
    module(sx)
    for h in handles:
        h.remove()
    handles = [m.register_forward_hook(normalise) for m in norms]
    try:
        return module(qx)
    finally:
        for h in handles:
            h.remove()


def reference(learner, batch, steps, first_order):
    """Query outputs after 0..steps inner steps ``[B, steps + 1, M, N]``, by learn2learn's module surgery."""
    l2l = require_learn2learn()
    anil = isinstance(learner, ANIL)
    net, norm = learner.backbone, learner.hparams.batch_norm
    outputs = []
    flagged = [m for m in net.modules() if getattr(m, "inplace", False)]  # the same function, out of place
    for m in flagged:
        m.inplace = False
    for sx, sy, qx, _ in zip(*batch):
        if anil:  # the body on the support set, and on the queries (with the support's statistics, or their own)
            sx, qx = net.forward_features(sx), queries(net.features, sx, qx, norm)
        clone = l2l.clone_module(net.head if anil else net)
        for p in clone.parameters():  # zero_head: a head that is not trained still adapts in the inner loop
            if not p.requires_grad:
                p.requires_grad_()
        task = [queries(clone, sx, qx, norm)]
        for step in range(steps):
            loss = task_loss(clone(sx), sy)
            named = list(clone.named_parameters())
            grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=not first_order)
            for (name, p), g in zip(named, grads):
                p.update = -rate(learner, step, name) * g
            clone = l2l.update_module(clone)
            task.append(queries(clone, sx, qx, norm))
        outputs.append(torch.stack(task))
    for m in flagged:
        m.inplace = True
    return torch.stack(outputs)


def task_loss(outputs, targets):
    """Cross-entropy for labels, MSE for float targets (one output per example)."""
    if targets.is_floating_point():
        return nn.functional.mse_loss(outputs.squeeze(-1), targets)
    return nn.functional.cross_entropy(outputs, targets)


def reference_meta_loss(learner, batch):
    out = reference(learner, batch, learner.hparams.inner_steps, learner.hparams.first_order)
    losses = torch.stack([task_loss(out[:, t].flatten(0, 1), batch.query_y.flatten())
                          for t in range(1, out.shape[1])])
    if learner.hparams.multi_step_loss:
        return (learner.msl_weights().to(losses) * losses).sum()
    return losses[-1]


def meta_gradients(learner, loss):
    params = [p for p in learner.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def pairs(nets, variants):
    """(network, variant) pairs; ANIL needs a backbone with ``forward_features`` and a ``head`` (the library's)."""
    return [(n, v) for n in nets for v in variants
            if v != "anil" or n in ("mlp", "conv_bn", "conv_bn_transductive", "dropout")]


def engines(net_name, variant):
    """Every engine where the pair is one the compiled engine runs on (see the module's docstring), else the eager
    ones."""
    compiled_too = net_name == "mlp" or variant == "maml_3steps"
    return ENGINES if compiled_too else ENGINES[:-1]


TRAIN_PAIRS = (pairs(TRAIN_NETS, [v for v in VARIANTS if v not in EDGE_VARIANTS])
               + pairs(EDGE_NETS, ["maml_3steps", "metasgd_first_order", "learned_rates"])
               + pairs(["mlp"], EDGE_VARIANTS) + [("conv_bn", "zero_head"), ("conv_bn", "loss_scale")])
# the compiled engine must compile: a fallback to eager would compare the eager numbers twice
strict_compile = pytest.mark.filterwarnings("error::lightning_meta.compile.CompileFallbackWarning")


def check_training(net_name, variant, engines, tol=SCALE_TOL):
    batch = episode(net_name)
    ref = build(net_name, variant, ENGINES[0])
    expected_loss = reference_meta_loss(ref, batch)
    expected = meta_gradients(ref, expected_loss)
    largest = max(g.abs().max().item() for g in expected)
    assert largest > 0
    for engine in engines:
        learner = build(net_name, variant, engine)
        loss = learner.training_step(batch, 0)
        assert_scaled_close(loss, expected_loss, f"{engine}: meta-loss", tol)
        for i, (got, want) in enumerate(zip(meta_gradients(learner, loss), expected, strict=True)):
            assert_scaled_close(got, want, f"{engine}: meta-gradient {i}", tol, zero=1e-4 * largest)


@strict_compile
@pytest.mark.parametrize(("net_name", "variant"), TRAIN_PAIRS)
def test_every_engine_gives_the_reference_meta_loss_and_meta_gradients(net_name, variant):
    check_training(net_name, variant, engines(net_name, variant))


@strict_compile
def test_the_compiled_engine_with_inductor_s_kernels_gives_the_reference_meta_gradients():
    # the other compiled cases run the traced graph by aot_eager; this one runs inductor's generated kernels
    torch.compiler.reset()
    check_training("mlp", "maml_3steps", [dict(task_parallel="vmap", task_chunk=2, compile=True)], tol=1e-7)


@strict_compile
@pytest.mark.parametrize(("net_name", "variant"), pairs(["mlp", "repeated", "tied", "conv_bn", "conv_bn_transductive",
                                                         "dropout", "sequence", "in_place", "regression"],
                                                        ["maml_3steps", "metasgd", "anil"])
                         + pairs(["mlp"], EDGE_VARIANTS) + [("conv_bn", "more_eval_steps")])
def test_every_engine_evaluates_and_adapts_as_the_reference(net_name, variant):
    batch = episode(net_name)
    ref_learner = build(net_name, variant, ENGINES[0]).eval()  # the reference: dropout off
    steps = ref_learner.eval_inner_steps
    expected = reference(ref_learner, batch, steps, first_order=True).detach()
    if batch.support_y.is_floating_point():
        expected = expected.squeeze(-1)  # scalar regression predictions are shaped like the targets
    for engine in engines(net_name, variant):
        learner = build(net_name, variant, engine).eval()
        with torch.inference_mode():  # as Lightning validates and tests
            assert_scaled_close(learner(batch), expected[:, -1], f"{engine}: evaluation")
            assert_scaled_close(learner.step_outputs(batch).squeeze(-1) if batch.support_y.is_floating_point()
                                else learner.step_outputs(batch), expected, f"{engine}: per-step outputs")
        learner.train()  # adapt() evaluates whatever mode the learner is in, and leaves that mode as it was
        for t in range(batch.num_tasks):
            predicted = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
            assert_scaled_close(predicted, expected[t, -1], f"{engine}: adapt() of task {t}")
        assert learner.training

