"""Differential test of every MAML engine: for a family of small networks (MLP; a layer applied twice; weights tied
between two layers; a convnet with batch norm; dropout) and every variant (MAML with 1 and 3 inner steps, first order,
learned per-layer rates, MAML++ per-step rates and multi-step loss, Meta-SGD, ANIL), each engine the learner can
run -- the task loop, the loop in task chunks, vmap (the hand-written batched chain where the network is a
linear/activation chain) and vmap in chunks with streamed meta-gradients -- gives the same meta-loss, meta-gradients
(initialization and learned rates), evaluation outputs, per-step outputs and `adapt()` predictions as a reference
built on learn2learn's own `clone_module`/`update_module` (its MAML's machinery), to 1e-5 in float64.

A new engine or fast path joins `ENGINES` to exist; the compiled inner loop (`compile=...`) is one."""

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
TOL = dict(atol=1e-5, rtol=1e-5)


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


NETS = {
    "mlp": lambda: MLP(4, (8, 8), 3),
    "twice": Twice,
    "repeated": repeated_layer,
    "tied": tied_layers,
    "conv_bn": lambda: Conv4(hidden=4, out_features=3, image_size=16),  # queries normalised by support statistics
    "conv_bn_transductive": lambda: Conv4(hidden=4, out_features=3, image_size=16),  # by their own
    "dropout": dropout_mlp,
}
# in training, dropout masks are random draws whose order differs between engines: dropout is compared in evaluation
TRAIN_NETS = [name for name in NETS if name != "dropout"]
VARIANTS = {
    "maml_1step": (MAML, dict(inner_steps=1)),
    "maml_3steps": (MAML, dict(inner_steps=3)),
    "first_order": (MAML, dict(inner_steps=3, first_order=True)),
    "learned_rates": (MAML, dict(inner_steps=2, learn_inner_lr=True)),
    "per_step_rates_msl": (MAML, dict(inner_steps=3, per_step_lr=True, multi_step_loss=True)),
    "metasgd": (MetaSGD, dict(inner_steps=2)),
    "metasgd_first_order": (MetaSGD, dict(inner_steps=2, first_order=True)),
    "anil": (ANIL, dict(inner_steps=3)),
}


def episode(net_name, b=4, n=3, k=2, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, 16) if net_name.startswith("conv_bn") else (4,)
    x = lambda m: torch.randn(b, m, *shape, generator=g, dtype=torch.float64)  # noqa: E731
    return Episode(x(n * k), torch.arange(n).repeat_interleave(k).repeat(b, 1), x(n * q),
                   torch.arange(n).repeat_interleave(q).repeat(b, 1))


def build(net_name, variant, engine, seed=0):
    cls, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    norm = "transductive" if net_name.endswith("_transductive") else "support"
    learner = cls(NETS[net_name](), inner_lr=0.3, batch_norm=norm, **kwargs, **engine).double()
    return learner


def rate(learner, step, name):
    if not len(learner.inner_lrs):
        return learner.hparams.inner_lr
    lr = learner.inner_lrs[name.replace(".", "__")]
    return lr if isinstance(learner, MetaSGD) else lr[min(step, lr.shape[0] - 1)]


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
    for sx, sy, qx, _ in zip(*batch):
        if anil:  # the body on the support set, and on the queries (with the support's statistics, or their own)
            sx, qx = net.forward_features(sx), queries(net.features, sx, qx, norm)
        clone = l2l.clone_module(net.head if anil else net)
        task = [queries(clone, sx, qx, norm)]
        for step in range(steps):
            loss = nn.functional.cross_entropy(clone(sx), sy)
            named = list(clone.named_parameters())
            grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=not first_order)
            for (name, p), g in zip(named, grads):
                p.update = -rate(learner, step, name) * g
            clone = l2l.update_module(clone)
            task.append(queries(clone, sx, qx, norm))
        outputs.append(torch.stack(task))
    return torch.stack(outputs)


def reference_meta_loss(learner, batch):
    out = reference(learner, batch, learner.hparams.inner_steps, learner.hparams.first_order)
    losses = torch.stack([nn.functional.cross_entropy(out[:, t].flatten(0, 1), batch.query_y.flatten())
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


@pytest.mark.parametrize(("net_name", "variant"), pairs(TRAIN_NETS, VARIANTS))
def test_every_engine_gives_the_reference_meta_loss_and_meta_gradients(net_name, variant):
    batch = episode(net_name)
    ref = build(net_name, variant, ENGINES[0])
    expected_loss = reference_meta_loss(ref, batch)
    expected = meta_gradients(ref, expected_loss)
    assert any(g.abs().sum() > 0 for g in expected)
    for engine in ENGINES:
        learner = build(net_name, variant, engine)
        loss = learner.training_step(batch, 0)
        torch.testing.assert_close(loss, expected_loss, **TOL, msg=lambda m, e=engine: f"{e}: meta-loss {m}")
        for got, want in zip(meta_gradients(learner, loss), expected, strict=True):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, e=engine: f"{e}: meta-gradient {m}")


@pytest.mark.parametrize(("net_name", "variant"), pairs(["mlp", "repeated", "tied", "conv_bn", "conv_bn_transductive",
                                                         "dropout"],
                                                        ["maml_3steps", "metasgd", "anil"]))
def test_every_engine_evaluates_and_adapts_as_the_reference(net_name, variant):
    batch = episode(net_name)
    ref_learner = build(net_name, variant, ENGINES[0]).eval()  # the reference: dropout off
    steps = ref_learner.hparams.inner_steps
    expected = reference(ref_learner, batch, steps, first_order=True).detach()
    for engine in ENGINES:
        learner = build(net_name, variant, engine).eval()
        with torch.inference_mode():  # as Lightning validates and tests
            torch.testing.assert_close(learner(batch), expected[:, -1], **TOL)
            torch.testing.assert_close(learner.step_outputs(batch), expected, **TOL)
        learner.train()  # adapt() evaluates whatever mode the learner is in, and leaves that mode as it was
        for t in range(batch.num_tasks):
            predicted = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
            torch.testing.assert_close(predicted, expected[t, -1], **TOL)
        assert learner.training

