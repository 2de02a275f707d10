"""torch.compile: every learner compiled (inductor, the default backend) gives the eager numbers -- training meta-loss,
meta-gradients, evaluation outputs, a whole fit's weights and logged metrics -- whichever way compilation is asked
for (the learner's ``compile`` option, ``trainer.fit(torch.compile(learner))``, a compiled backbone); a run with fixed
episode shapes compiles nothing after its first steps and never breaks a graph; a core that cannot be compiled, or
whose compiled numbers differ, runs eagerly after one warning. (The MAML engines' differential test, tests/
test_engines.py, covers the compiled inner loop on every network and variant against learn2learn's machinery.)"""

import copy

import lightning as L
import pytest
import torch
from helpers import blob_data, blobs, trainer
from torch import nn

from lightning_meta import ANIL, MAML, AttentionLearner, Episode, LabelledBatch, MetaSGD, Pretrainer, ProtoNet
from lightning_meta.compile import CompileFallbackWarning, compile_counts
from lightning_meta.data import TensorClassDataset
from lightning_meta.models import MLP, Conv4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (dynamo caches compiled code per code object, across learners)."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def conv():
    return Conv4(hidden=4, out_features=3, image_size=16)


LEARNERS = {  # name -> (builder, input shape); convnets with batch norm and pooling, and an MLP
    "maml_loop": (lambda **k: MAML(conv(), inner_lr=0.3, task_parallel="loop", **k), (1, 16, 16)),
    "maml_vmap_transductive": (lambda **k: MAML(conv(), inner_lr=0.3, task_parallel="vmap",
                                                batch_norm="transductive", **k), (1, 16, 16)),
    "maml_mlp_2steps_msl": (lambda **k: MAML(MLP(4, (8, 8), 3), inner_lr=0.3, inner_steps=2, per_step_lr=True,
                                             multi_step_loss=True, **k), (4,)),
    "metasgd": (lambda **k: MetaSGD(conv(), inner_lr=0.3, **k), (1, 16, 16)),
    "anil": (lambda **k: ANIL(conv(), inner_lr=0.3, inner_steps=2, **k), (1, 16, 16)),
    "protonet": (lambda **k: ProtoNet(Conv4(hidden=4, image_size=16), **k), (1, 16, 16)),
    "attention": (lambda **k: AttentionLearner(Conv4(hidden=4, image_size=16), dim=8, depth=1, heads=2, **k),
                  (1, 16, 16)),
}


def episode(shape, b=3, n=3, k=2, q=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = lambda m: torch.randn(b, m, *shape, generator=g, dtype=dtype)  # noqa: E731
    return Episode(x(n * k), torch.arange(n).repeat_interleave(k).repeat(b, 1), x(n * q),
                   torch.arange(n).repeat_interleave(q).repeat(b, 1))


def pair(name, dtype=torch.float64, **compile_kw):
    """The same learner twice, eager and compiled, with the same weights."""
    build, shape = LEARNERS[name]
    torch.manual_seed(0)
    eager = build().to(dtype)
    compiled = build(**compile_kw or {"compile": True}).to(dtype)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled, shape


def gradients(learner):
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def assert_same_step(eager, compiled, batch, rtol):
    """Meta-loss and meta-gradients of one training step, and evaluation outputs; gradient differences are measured
    against the largest gradient (a conv bias before batch norm has a gradient that is zero up to rounding)."""
    loss_e, loss_c = eager.training_step(batch, 0), compiled.training_step(batch, 0)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=0)
    ge, gc = gradients(eager), gradients(compiled)
    assert ge.keys() == gc.keys() and ge
    scale = max(g.abs().max() for g in ge.values())
    assert scale > 0
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=0, atol=rtol * scale, msg=lambda m, n=n: f"{n}: {m}")
    eager.eval(), compiled.eval()
    with torch.inference_mode():  # as Lightning validates
        out_e, out_c = eager(batch), compiled(batch)
    torch.testing.assert_close(out_c, out_e, rtol=rtol, atol=rtol * out_e.abs().max())


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_compiled_gives_the_eager_meta_loss_gradients_and_outputs_in_float64(name):
    eager, compiled, shape = pair(name)
    with _no_fallback():  # ProtoNet's distances are float32 by design (its embeddings are cast)
        assert_same_step(eager, compiled, episode(shape), rtol=1e-5 if name == "protonet" else 1e-9)
    assert compiled.compiled_cores(), "nothing was compiled"
    assert compiled.compiled_fallbacks() == {}


@pytest.mark.parametrize("name", ["maml_loop", "protonet", "attention"])
def test_compiled_float32_is_within_float32_rounding_of_eager(name):
    eager, compiled, shape = pair(name, dtype=torch.float32)
    with _no_fallback():
        assert_same_step(eager, compiled, episode(shape, dtype=torch.float32), rtol=1e-4)


def test_pretrainer_compiled_classifies_and_evaluates_as_eager():
    torch.manual_seed(0)
    eager = Pretrainer(Conv4(hidden=4, image_size=16), num_classes=5).double()
    compiled = Pretrainer(Conv4(hidden=4, image_size=16), num_classes=5, compile=True).double()
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = LabelledBatch(torch.randn(10, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(10) % 5)
    with _no_fallback():
        losses = [m.training_step(batch, 0) for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
        for n, g in gradients(eager).items():
            torch.testing.assert_close(gradients(compiled)[n], g, rtol=1e-9, atol=1e-12)
        eager.eval(), compiled.eval()
        batch = episode((1, 16, 16))
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-9, atol=1e-9)
    assert {"classifier logits", "episode logits"} <= set(compiled.compiled_cores())


class Recorder(L.Callback):
    """Compile counts at the end of every training epoch, and the logged metrics."""

    def __init__(self):
        self.counts, self.metrics = [], []

    def on_train_epoch_end(self, trainer, module):
        self.counts.append(compile_counts())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(learner, epochs=3):
    recorder = Recorder()
    t = trainer(max_epochs=epochs, precision="64-true", callbacks=[recorder], limit_val_batches=3)
    t.fit(learner, blob_data(n_way=3, meta_batch_size=2, train_episodes=8))
    return learner, recorder


@pytest.mark.parametrize("route", ["option", "torch.compile(learner)", "torch.compile(backbone)"])
def test_fit_compiled_by_each_route_ends_with_the_eager_weights_and_metrics(route):
    """Lightning's own route compiles ``training_step``; the learner takes that over and compiles its inner loop."""
    torch.manual_seed(0)
    net = MLP(8, (16,), 3)
    eager, eager_run = fit(MAML(copy.deepcopy(net), inner_lr=0.5, inner_steps=2))
    torch.manual_seed(0)
    if route == "option":
        learner = model = MAML(copy.deepcopy(net), inner_lr=0.5, inner_steps=2, compile=True)
    elif route == "torch.compile(learner)":
        learner = MAML(copy.deepcopy(net), inner_lr=0.5, inner_steps=2)
        model = torch.compile(learner)
    else:
        learner = model = MAML(torch.compile(copy.deepcopy(net)), inner_lr=0.5, inner_steps=2)
    before = compile_counts()
    with _no_fallback():
        _, run = fit(model)
    assert compile_counts().graphs > before.graphs, "the inner loop was not compiled"
    assert learner.compiler is not None and learner.compiled_cores()
    assert list(learner.state_dict()) == list(eager.state_dict())  # plain names: checkpoints do not depend on it
    for n, p in eager.state_dict().items():
        torch.testing.assert_close(learner.state_dict()[n], p, rtol=1e-9, atol=1e-12)
    assert learner.training_step.__func__ is MAML.training_step  # the step itself is not traced
    for got, want in zip(run.metrics, eager_run.metrics, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_fixed_shapes_compile_nothing_after_the_first_epoch_and_break_no_graph(name):
    torch.manual_seed(0)
    learner = (MAML(Conv4(hidden=4, out_features=3, image_size=16), inner_lr=0.3, compile=True) if name == "maml"
               else ProtoNet(Conv4(hidden=4, image_size=16), compile=True))
    data = blob_data(n_way=3, meta_batch_size=2, train_episodes=6, train=_images(0), val=_images(1), test=_images(2))
    recorder = Recorder()
    start = compile_counts()
    trainer(max_epochs=3, callbacks=[recorder], limit_val_batches=2).fit(learner, data)
    first, last = recorder.counts[0], recorder.counts[-1]
    assert first.graphs > start.graphs  # training and validation compiled in the first epoch
    assert last == first, f"compiled again after warm-up: {first} -> {last}"
    assert last.graph_breaks == start.graph_breaks == 0
    assert learner.compiled_fallbacks() == {}


def test_a_backbone_that_breaks_the_graph_runs_eagerly_with_one_warning_naming_why():
    class DataDependent(nn.Module):  # Python control flow on a tensor's value: no single graph
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.body(x)
            return self.head(h if h.sum().item() > 0 else -h)

    torch.manual_seed(0)
    eager = MAML(DataDependent(), inner_lr=0.3, task_parallel="loop").double()  # vmap refuses .item() even eagerly
    compiled = MAML(DataDependent(), inner_lr=0.3, task_parallel="loop", compile=True).double()
    compiled.load_state_dict(eager.state_dict())
    batch = episode((4,))
    with pytest.warns(CompileFallbackWarning, match=r"runs eagerly: torch.compile failed: .*data-dependent"):
        loss = compiled.training_step(batch, 0)
    torch.testing.assert_close(loss, eager.training_step(batch, 0), rtol=0, atol=0)
    with _no_fallback():  # once: the next steps run eagerly without a word
        compiled.training_step(batch, 0)
    assert list(compiled.compiled_fallbacks().values())[0].startswith("torch.compile failed")


def test_a_compiled_core_whose_numbers_differ_from_eager_falls_back_to_the_eager_numbers():
    def off_by_a_little(graph, example_inputs):  # a "compiler" that changes the outputs by 1%
        def run(*args):
            return [o * 1.01 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in graph(*args)]
        return run

    torch.manual_seed(0)
    eager = ProtoNet(MLP(4, (8,))).double()
    compiled = ProtoNet(MLP(4, (8,)), compile={"backend": off_by_a_little}).double()
    compiled.load_state_dict(eager.state_dict())
    batch = episode((4,))
    with pytest.warns(CompileFallbackWarning, match=r"episode logits runs eagerly: output 0 differs from eager by"):
        out = compiled(batch)
    torch.testing.assert_close(out, eager(batch), rtol=0, atol=0)


def test_bad_input_gets_the_eager_error_not_a_compiler_failure():
    learner = AttentionLearner(MLP(4, (8,)), embedding_dim=5, dim=8, depth=1, heads=2, compile=True)
    with _no_fallback(), pytest.raises(ValueError, match=r"embeddings of size 8, but .* embedding_dim=5"):
        learner(episode((4,), dtype=torch.float32))
    assert learner.compiled_fallbacks() == {}


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match=r"`compile` to be a bool or a dict of torch.compile arguments"):
        ProtoNet(MLP(4, (8,)), compile="max-autotune")
    with pytest.raises(ValueError, match=r"Unknown torch.compile arguments in `compile`: \['fast'\]"):
        ProtoNet(MLP(4, (8,)), compile={"fast": True})


@pytest.mark.parametrize("name", ["maml_loop", "maml_vmap_transductive"])
def test_bf16_mixed_compiled_matches_eager_bf16_within_bf16_rounding(name):
    """And runs compiled: the first-call check allows bfloat16's rounding under bf16 autocast."""
    eager, compiled, shape = pair(name, dtype=torch.float32)
    batch = episode(shape, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), _no_fallback():
        losses = [m.training_step(batch, 0) for m in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)
    assert compiled.compiled_cores() and compiled.compiled_fallbacks() == {}


def test_bf16_mixed_compiled_inner_loop_runs_every_convolution_in_bf16():
    """Autocast reaches the whole compiled inner loop, the inner backward and the outer backward included: every
    convolution of the traced forward and backward graphs takes bfloat16 inputs (one task per graph)."""
    from torch._dynamo.backends.common import aot_autograd

    dtypes = []

    def record(graph, example_inputs):
        for node in graph.graph.nodes:
            if node.op == "call_function" and "convolution" in str(node.target):
                dtypes.append(node.args[0].meta["val"].dtype)
        return graph

    torch.manual_seed(0)
    learner = MAML(conv(), inner_lr=0.3, task_parallel="loop",
                   compile={"backend": aot_autograd(fw_compiler=record, bw_compiler=record)})
    batch = episode((1, 16, 16), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), _no_fallback():
        learner.training_step(batch, 0).backward()
    assert len(dtypes) >= 8 * 3  # 4 layers: support forward, inner backward, query forward, and their backward
    assert set(dtypes) == {torch.bfloat16}


def _images(seed):
    """Blob classes as 1x16x16 images (each 8-dim point tiled), so the convnets see fixed-shape episodes."""
    source = blobs(seed=seed)
    return TensorClassDataset(source.x.repeat(1, 32).view(-1, 1, 16, 16), source.labels, source.class_names)


class _no_fallback:
    """Fails the test on any CompileFallbackWarning."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", CompileFallbackWarning)
        return self

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def _backward_off_by(factor, after_compiles=0):
    """A backend whose forward is exact and whose backward is off by ``factor``, from its ``after_compiles``-th
    compilation on (the first ones exact)."""
    from torch._dynamo.backends.common import aot_autograd

    compiles = []

    def forward(graph, example_inputs):
        compiles.append(graph)
        return graph

    def backward(graph, example_inputs):
        off = len(compiles) > after_compiles

        def run(*args):
            outs = graph(*args)
            return [o * factor if off and isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outs]

        run._boxed_call = getattr(graph, "_boxed_call", False)
        return run

    return aot_autograd(fw_compiler=forward, bw_compiler=backward)


def test_a_compiled_inner_loop_whose_meta_gradient_differs_from_eager_falls_back_to_eager():
    # before: the first-call check compared the forward only (under no_grad), so a wrong second-order backward
    # (what MAML takes from the compiled graph) trained on silently
    torch.manual_seed(0)
    eager = MAML(MLP(4, (8,), 3), inner_lr=0.3, task_parallel="vmap").double()
    compiled = MAML(MLP(4, (8,), 3), inner_lr=0.3, task_parallel="vmap",
                    compile={"backend": _backward_off_by(1.01)}).double()
    compiled.load_state_dict(eager.state_dict())
    batch = episode((4,))
    with pytest.warns(CompileFallbackWarning, match=r"inner loop .* runs eagerly: its gradient \(of every input and "
                                                    r"parameter.*\) differs from eager's by 0.01 of its norm"):
        loss = compiled.training_step(batch, 0)
    want = eager.training_step(batch, 0)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(loss, list(compiled.parameters())),
                    torch.autograd.grad(want, list(eager.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_new_input_signature_is_checked_not_only_the_first_call():
    # a last, uneven chunk (meta-batch 5 in chunks of 2) compiles a second graph: its first call is checked too
    torch.manual_seed(0)
    compiled = MAML(MLP(4, (8,), 3), inner_lr=0.3, task_parallel="vmap", task_chunk=2,
                    compile={"backend": _backward_off_by(1.01, after_compiles=1)}).double()
    five = episode((4,), b=5)
    with pytest.warns(CompileFallbackWarning, match=r"differs from eager"):
        compiled.training_step(five, 0)
