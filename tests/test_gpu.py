"""CUDA checks: float16 mixed precision ("16-mixed") is GPU-only in Lightning, so these run where a GPU is present
(the CI machine has none: there they are skipped and the CPU tests cover every other path). Run them with
``python -m pytest tests/test_gpu.py`` on a CUDA machine; the README records the last such run."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import blob_data, sine_data, trainer

from lightning_meta import ANIL, MAML, AttentionLearner, EpisodicDataModule, MetaSGD, ProtoNet
from lightning_meta.data import SyntheticGlyphs
from lightning_meta.functional import inner_adapt
from lightning_meta.models import MLP, Conv4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (16-mixed is GPU-only)")


def glyph_data(train_episodes=120, way=5, shot=1):
    return EpisodicDataModule(
        train=SyntheticGlyphs("train"), val=SyntheticGlyphs("val"), test=SyntheticGlyphs("test"),
        n_way=way, n_shot=shot, n_query=5, meta_batch_size=4, train_episodes=train_episodes, val_episodes=16,
        test_episodes=100, seed=0,
    )


@contextlib.contextmanager
def no_tf32():
    """Full float32 convolutions and matmuls (CUDA's default TF32 rounds inputs to 10 bits)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


LEARNERS = {
    "protonet": lambda: ProtoNet(Conv4(hidden=32), lr=2e-3),
    "maml": lambda: MAML(Conv4(hidden=32, out_features=5), inner_lr=0.4, inner_steps=1, eval_inner_steps=3, lr=2e-3),
    "maml-vmap": lambda: MAML(Conv4(hidden=32, out_features=5), inner_lr=0.4, task_parallel="vmap", lr=2e-3),
    "anil": lambda: ANIL(Conv4(hidden=32, out_features=5), inner_lr=0.4, eval_inner_steps=3, lr=2e-3),
    "metasgd": lambda: MetaSGD(Conv4(hidden=32, out_features=5), inner_lr=0.4, lr=2e-3),
    "attention": lambda: AttentionLearner(Conv4(hidden=32), max_way=5, dim=64, depth=2, heads=4, lr=1e-3),
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_every_learner_trains_on_cuda_in_each_precision(name, precision):
    torch.manual_seed(0)
    model, dm = LEARNERS[name](), glyph_data()
    before = trainer(accelerator="cuda", devices=1).test(model, dm, verbose=False)[0]["test/acc"]
    t = trainer(accelerator="cuda", devices=1, precision=precision, max_epochs=3, limit_val_batches=2)
    t.fit(model, dm)
    assert t.precision == precision and t.strategy.root_device.type == "cuda"
    assert torch.isfinite(t.logged_metrics["train/loss"]) and "val/acc" in t.logged_metrics
    res = t.test(model, dm, verbose=False)[0]
    # 5-way: chance is 20%; every learner leaves chance and improves on its untrained self
    assert res["test/acc"] > max(before + 0.1, 0.4), (before, res)
    assert 0 < res["test/acc_ci95"] < 0.1


def test_float16_inner_loss_scale_keeps_small_inner_gradients_alive_under_cuda_autocast():
    torch.manual_seed(0)
    params = {"weight": torch.rand(1, 4, device="cuda").requires_grad_()}
    x = torch.full((8, 4), 1e-3, device="cuda")

    def forward(p, xs):
        return F.linear(xs, p["weight"])

    with torch.autocast("cuda", dtype=torch.float16), torch.no_grad():
        target = forward(params, x).float().squeeze(-1) + 1e-5  # residual 1e-5 on every support point

    def moved(scale):
        with torch.autocast("cuda", dtype=torch.float16):
            traj, losses, finite = inner_adapt(forward, params, x, target, 1, lambda s: {"weight": 1e3}, True, scale)
        return (traj[-1]["weight"] - params["weight"]).abs().max().item(), bool(finite.all())

    # dL/dw = 8 points * (2 * 1e-5 / 8) * 1e-3 = 2e-8, computed by a float16 matmul: below half of float16's smallest
    # subnormal (6e-8), so it rounds to zero and the inner step is lost. Scaled by 1024 it is 2e-5 in float16,
    # unscaled in float32, and the step moves the weights by 1e3 * 2e-8 = 2e-5.
    unscaled, _ = moved(1.0)
    scaled, ok = moved(1024.0)
    assert unscaled == 0.0
    assert ok and scaled == pytest.approx(2e-5, rel=0.05)


def test_16_mixed_meta_gradients_agree_with_float32_on_cuda():
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=16, out_features=3), inner_lr=0.4, inner_steps=2, inner_loss_scale=1024.0).cuda()
    # 5-shot: 1-shot batch norm makes the meta-gradient ill-conditioned (see test_maml.py)
    dm = glyph_data(way=3, shot=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader())).to("cuda")

    def grads(scale, dtype=None):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(batch, 0)
        (loss * scale).backward()  # outside autocast, as Lightning runs it; scaled as its GradScaler does
        return torch.cat([p.grad.flatten().float() / scale for p in model.parameters()])

    with no_tf32():
        full = grads(1.0)
    # GradScaler starts at 2**16 and halves the scale after every step with non-finite gradients
    scale = 2.0**16
    half = grads(scale, torch.float16)
    while not torch.isfinite(half).all() and scale >= 1:
        scale /= 2
        half = grads(scale, torch.float16)
    assert scale >= 1, "no outer loss scale gave finite float16 meta-gradients"
    cosine = F.cosine_similarity(full, half, dim=0).item()
    print(f"16-mixed vs float32 meta-gradient: cosine {cosine:.4f} at outer loss scale {scale:.0f}")
    assert cosine > 0.99


def test_maml_sinusoid_converges_under_16_mixed_on_cuda():
    torch.manual_seed(0)
    model = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=1, lr=3e-3)
    dm = sine_data(meta_batch_size=25, train_episodes=25 * 300, test_episodes=100)
    before = trainer(accelerator="cuda", devices=1).test(model, dm, verbose=False)[0]["test/mse"]
    t = trainer(accelerator="cuda", devices=1, max_epochs=1, precision="16-mixed", limit_val_batches=0)
    t.fit(model, dm)
    assert model.inner_scale == 1024.0
    after = t.test(model, dm, verbose=False)[0]["test/mse"]
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_hand_written_chain_gradients_match_autograd_on_cuda(cls, dtype):
    # the inner gradient of linear/activation chains is written out by hand (functional/batched.py): on CUDA, in
    # each autocast dtype, the meta-gradient must be autograd's (exactly in float32; to rounding in half precision)
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1) if cls is MAML else MLP(8, (32, 32), 3)
    dm = sine_data(meta_batch_size=25) if cls is MAML else blob_data(meta_batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader())).to("cuda")
    scale = 1024.0 if dtype is torch.float16 else None
    fast = cls(copy.deepcopy(net), inner_lr=0.01, inner_steps=2, task_parallel="vmap", inner_loss_scale=scale).cuda()
    slow = cls(copy.deepcopy(net), inner_lr=0.01, inner_steps=2, task_parallel="vmap", inner_loss_scale=scale).cuda()
    assert fast.engine.network(fast.adapted_module()).chain_grads is not None
    slow.engine.batched_chain = False

    def grads(model):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(batch, 0)
        return torch.cat([g.flatten().float() for g in torch.autograd.grad(loss, list(model.backbone.parameters()))])

    with no_tf32():
        a, b = grads(fast), grads(slow)
    assert torch.isfinite(a).all()
    if dtype is None:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    else:
        assert F.cosine_similarity(a, b, dim=0).item() > 0.99


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_meta_gradients_taken_chunk_by_chunk_train_under_mixed_precision_on_cuda(precision):
    # task_chunk: each chunk's meta-gradient is taken as soon as it is done; under 16-mixed it must use the gradient
    # scaler's scale, and overflows must reach the scaler (which skips the step) instead of stopping training
    torch.manual_seed(0)
    model, dm = MAML(Conv4(hidden=32, out_features=5), inner_lr=0.4, task_parallel="vmap", task_chunk=2,
                     lr=2e-3), glyph_data()
    before = trainer(accelerator="cuda", devices=1).test(model, dm, verbose=False)[0]["test/acc"]
    t = trainer(accelerator="cuda", devices=1, precision=precision, max_epochs=3, limit_val_batches=2)
    t.fit(model, dm)
    assert model.streams
    scaler = getattr(t.precision_plugin, "scaler", None)
    if precision == "16-mixed":
        assert scaler is not None and model.meta_gradient_scale == scaler.get_scale()
    res = t.test(model, dm, verbose=False)[0]
    assert res["test/acc"] > max(before + 0.1, 0.4), (before, res)


def test_vmap_and_loop_agree_for_convolutional_maml_on_cuda():
    torch.manual_seed(0)
    net = Conv4(hidden=16, out_features=5)
    dm = glyph_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader())).to("cuda")
    with no_tf32():
        outs = [MAML(copy.deepcopy(net), inner_lr=0.4, task_parallel=tp).cuda()(batch) for tp in ("vmap", "loop")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_a_checkpoint_trained_on_cuda_in_16_mixed_predicts_the_same_on_cpu(tmp_path):
    torch.manual_seed(0)
    model, dm = ProtoNet(Conv4(hidden=32), lr=2e-3), glyph_data(train_episodes=40)
    t = trainer(accelerator="cuda", devices=1, precision="16-mixed", limit_val_batches=2, default_root_dir=tmp_path)
    t.fit(model, dm)
    path = tmp_path / "gpu.ckpt"
    t.save_checkpoint(path)
    loaded = ProtoNet.load_from_checkpoint(path, backbone=Conv4(hidden=32), map_location="cpu")
    batch = next(iter(dm.val_dataloader()))
    model.cpu().eval(), loaded.eval()  # Lightning moves the model back to the CPU after fit
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


# ------------------------------------------------------------------ variable episodes and Meta-Dataset records (#29, #30)
VARIABLE = dict(min_way=3, max_way=8, max_query=5, max_support=40, max_support_per_class=8)
RAGGED_LEARNERS = {
    "protonet": lambda: ProtoNet(Conv4(hidden=32), lr=2e-3),
    "attention": lambda: AttentionLearner(Conv4(hidden=32), max_way=8, dim=64, depth=2, heads=4, lr=1e-3),
    "maml": lambda: MAML(Conv4(hidden=32, out_features=8), inner_lr=0.4, lr=2e-3),
    "maml-vmap": lambda: MAML(Conv4(hidden=32, out_features=8), inner_lr=0.4, task_parallel="vmap", lr=2e-3),
    "fo-proto-maml": lambda: MAML(Conv4(hidden=32, out_features=8), inner_lr=0.05, first_order=True,
                                  head_init="prototypes", lr=2e-3),
}


def variable_glyphs(**kw):
    from lightning_meta.data import VariableEpisodes

    args = dict(train=SyntheticGlyphs("train"), val=SyntheticGlyphs("val"), test=SyntheticGlyphs("test"),
                n_way=None, n_shot=None, n_query=None, variable_episodes=VariableEpisodes(**VARIABLE),
                meta_batch_size=4, train_episodes=80, val_episodes=8, test_episodes=40, seed=0)
    args.update(kw)
    return EpisodicDataModule(**args)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", list(RAGGED_LEARNERS))
def test_every_ragged_learner_trains_on_variable_episodes_on_cuda_in_each_precision(name, precision):
    torch.manual_seed(0)
    model, dm = RAGGED_LEARNERS[name](), variable_glyphs(train_episodes=120)
    before = trainer(accelerator="cuda", devices=1).test(model, dm, verbose=False)[0]["test/acc"]
    t = trainer(accelerator="cuda", devices=1, precision=precision, max_epochs=3, limit_val_batches=2)
    t.fit(model, dm)
    assert t.strategy.root_device.type == "cuda" and torch.isfinite(t.logged_metrics["train/loss"])
    res = t.test(model, dm, verbose=False)[0]
    # 3-8 way (chance 1/3 to 1/8): every learner improves on its untrained self
    assert res["test/acc"] > before + 0.1, (before, res)
    assert 0 < res["test/acc_ci95"] < 0.15


def test_ragged_maml_meta_gradients_on_cuda_equal_the_cpus():
    torch.manual_seed(0)
    model = MAML(Conv4(hidden=16, out_features=8), inner_lr=0.4, inner_steps=2, variable_ways=True)
    dm = variable_glyphs()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(set(batch.ways)) > 1  # the meta-batch mixes ways: several shape groups

    def grads(device):
        m = copy.deepcopy(model).to(device)
        loss = m.training_step(batch.to(device), 0)
        loss.backward()
        return torch.cat([p.grad.flatten().cpu() for p in m.parameters()])

    cpu = grads("cpu")
    with no_tf32():
        cuda = grads("cuda")
    assert torch.allclose(cuda, cpu, rtol=1e-3, atol=1e-5), (cuda - cpu).abs().max()


def test_metadataset_records_feed_a_cuda_fit_through_workers_from_both_stores(tmp_path):
    from lightning_meta.data import MetaDatasetRecords
    from lightning_meta.data.datasets.metadataset import solid_jpeg, write_source

    spec = {"__class__": "DatasetSpecification", "name": "toy", "path": "", "file_pattern": "{}.tfrecords",
            "classes_per_split": {"TRAIN": 40, "VALID": 20, "TEST": 0},
            "images_per_class": {str(c): 6 + c % 5 for c in range(60)}, "class_names": {str(c): f"c{c}" for c in range(60)}}
    write_source(tmp_path / "toy", spec, lambda c, i: solid_jpeg(c, i, 28))
    for store in ("encoded", "decoded"):
        train = MetaDatasetRecords(tmp_path / "toy", "train", image_size=28, store=store, cache=tmp_path / "c")
        val = MetaDatasetRecords(tmp_path / "toy", "val", image_size=28, store=store, cache=tmp_path / "c")
        dm = variable_glyphs(train=train, val=val, test=None, num_workers=4, train_episodes=40)
        model = ProtoNet(Conv4(in_channels=3, hidden=32), lr=2e-3)
        t = trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_epochs=1, limit_val_batches=2)
        t.fit(model, dm)
        assert torch.isfinite(t.logged_metrics["train/loss"]) and "val/acc" in t.logged_metrics, store
