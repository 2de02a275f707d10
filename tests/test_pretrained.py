"""Pretrained backbones end to end: timm and torchvision weights from local files (nothing downloads here), their
input normalisation applied once on the device on every path, recorded in the checkpoint, overridable, and a
checkpoint that reloads with no network and no weight file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_meta
from lightning_meta import MAML, AttentionLearner, EpisodicDataModule, Pretrainer, ProtoNet
from lightning_meta.cli import run
from lightning_meta.data import TensorClassDataset
from lightning_meta.models import (
    Conv4,
    backbone_spec,
    build_backbone,
    input_normalization,
    timm_backbone,
    torchvision_backbone,
)

timm = pytest.importorskip("timm")
tv_models = pytest.importorskip("torchvision.models")

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)  # test_resnet's pretrained_cfg, overlaid: one value per channel
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def timm_file(tmp_path, seed=0):
    """A local weight file of timm's tiny `test_resnet` (no classifier), and its tensors."""
    torch.manual_seed(seed)
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    path = tmp_path / f"test_resnet{seed}.pth"
    torch.save(state, path)
    return path, state


def pretrained(path, **kw):
    return timm_backbone("test_resnet", pretrained=True,
                         pretrained_cfg_overlay={"file": str(path), "mean": MEAN, "std": STD}, **kw)


def torchvision_file(torch_home):
    """torchvision's shufflenet_v2_x0_5 weights, made here, where torch.hub's cache looks for the real file (the
    hash in its name is checked only on download)."""
    weights = tv_models.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1
    torch.manual_seed(1)
    state = tv_models.shufflenet_v2_x0_5().state_dict()
    target = Path(torch_home) / "hub" / "checkpoints" / os.path.basename(weights.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target, state


def normalised(x, mean=MEAN, std=STD):
    """The manual reference: (x / 255 - mean) / std over the channel dimension of uint8 images [..., C, H, W]."""
    return (x.float() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def images(float_images=False, seed=0, prefix="c"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (8 * 4, 3, 16, 16), generator=g, dtype=torch.uint8)
    return TensorClassDataset(normalised(x) if float_images else x, torch.arange(8).repeat_interleave(4),
                              class_names=[f"{prefix}{i}" for i in range(8)])


def data(float_images=False, pretrain=False):
    return EpisodicDataModule(train=images(float_images), val=images(float_images, 1, "v"),
                              test=images(float_images, 2, "t"), n_way=3, n_shot=1, n_query=2, meta_batch_size=2,
                              train_episodes=4, val_episodes=2, test_episodes=2,
                              pretrain_batch_size=8 if pretrain else None)


def trainer(tmp_path, **kw):
    return L.Trainer(**{"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                        "default_root_dir": tmp_path, "limit_val_batches": 1, "enable_checkpointing": False, **kw})


LEARNERS = {
    "protonet": lambda backbone, **kw: ProtoNet(backbone(), **kw),
    "maml": lambda backbone, **kw: MAML(backbone(num_classes=3), inner_lr=0.05, inner_steps=1, first_order=True,
                                        task_parallel="loop", **kw),
    "attention": lambda backbone, **kw: AttentionLearner(backbone(), max_way=5, dim=16, **kw),
    "pretrainer": lambda backbone, **kw: Pretrainer(backbone(), num_classes=8, **kw),
}


# ------------------------------------------------------------------------------------------------ loading weights
def test_timm_pretrained_weights_are_the_local_files_and_the_recorded_spec_rebuilds_without_them(tmp_path):
    path, state = timm_file(tmp_path)
    net = pretrained(path)
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the file's weights, not fresh ones
    assert input_normalization(net) == (MEAN, STD)  # the weights' pretrained_cfg mean and std
    spec = backbone_spec(net)
    assert "pretrained" not in spec["init_args"] and spec["init_args"]["pretrained_cfg_overlay"] == {"mean": MEAN,
                                                                                                    "std": STD}
    path.unlink()  # the architecture rebuilds without the file (and without a download)
    rebuilt = build_backbone(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    # timm's own config when not overlaid; with one input channel, its channel average
    path, _ = timm_file(tmp_path, seed=1)
    own = timm_backbone("test_resnet", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert input_normalization(own) == ((0.5,) * 3, (0.5,) * 3)
    grey = timm_backbone("test_resnet", pretrained=True, in_chans=1, pretrained_cfg_overlay={"file": str(path),
                                                                                              "mean": MEAN, "std": STD})
    (grey_mean,), (grey_std,) = input_normalization(grey)
    assert (grey_mean, grey_std) == pytest.approx((0.4, 0.25))
    # a checkpoint file loaded by timm after building counts as pretrained weights too, and is not recorded either
    by_path = timm_backbone("test_resnet", checkpoint_path=str(path))
    assert input_normalization(by_path) == ((0.5,) * 3, (0.5,) * 3) and "checkpoint_path" not in str(backbone_spec(by_path))
    assert input_normalization(timm_backbone("test_resnet")) is None  # no weights: no normalisation of its own


def test_torchvision_weights_come_from_the_hub_cache_and_the_recorded_spec_rebuilds_without_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    target, state = torchvision_file(tmp_path / "home")
    net = torchvision_backbone("shufflenet_v2_x0_5", weights="DEFAULT")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # fc removed: every other tensor
    assert net.state_dict().keys() == state.keys() - {"fc.weight", "fc.bias"} and net.embedding_dim == 1024
    assert input_normalization(net) == IMAGENET  # the weights' transforms()
    spec = backbone_spec(net)
    assert spec["init_args"] == {"name": "shufflenet_v2_x0_5", "features_only": True, "num_classes": 1000}
    target.unlink()
    assert build_backbone(spec).state_dict().keys() == net.state_dict().keys()
    with pytest.raises(ValueError, match=r"shufflenet_v2_x0_5 has no weights 'IMAGENET9K': pass one of DEFAULT, "
                                         r"IMAGENET1K_V1"):
        torchvision_backbone("shufflenet_v2_x0_5", weights="IMAGENET9K")


# ------------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("kind", list(LEARNERS))
def test_the_weights_normalisation_is_applied_once_in_training_evaluation_predict_adapt_and_its_predictor(kind,
                                                                                                       tmp_path):
    """A learner on uint8 images computes exactly what a twin with normalize=None computes on (x/255 - mean)/std
    (neither never nor twice), in every path: Trainer fit (MAML's inner loop included), validate, test, predict,
    forward, adapt() and its predictor."""
    path, _ = timm_file(tmp_path)
    torch.manual_seed(0)
    learner = LEARNERS[kind](lambda **kw: pretrained(path, **kw))
    twin = LEARNERS[kind](lambda **kw: pretrained(path, **kw), normalize=None)
    twin.load_state_dict(learner.state_dict())
    assert learner.hparams.normalize == [list(MEAN), list(STD)] and twin.hparams.normalize is None
    pretrain = kind == "pretrainer"
    for model, dm in ((learner, data(pretrain=pretrain)), (twin, data(float_images=True, pretrain=pretrain))):
        torch.manual_seed(0)
        trainer(tmp_path, max_steps=1).fit(model, dm)
    for name, value in twin.state_dict().items():  # the same training steps
        torch.testing.assert_close(learner.state_dict()[name], value, msg=f"{kind}: {name} differs after fit")
    fits = [trainer(tmp_path).predict(model, dm) for model, dm in ((learner, data()), (twin, data(float_images=True)))]
    for got, want in zip(*fits):
        torch.testing.assert_close(got, want)
    evaluation = [trainer(tmp_path).test(model, dm, verbose=False)[0]
                  for model, dm in ((learner, data()), (twin, data(float_images=True)))]
    assert evaluation[0] == pytest.approx(evaluation[1])
    batch = next(iter(data().test_dataloader()))
    sx, sy, qx, qy = batch
    learner.eval(), twin.eval()
    manual = (normalised(sx), sy, normalised(qx), qy)
    torch.testing.assert_close(learner(batch), twin(manual))
    got = learner.adapt(sx[0], sy[0])(qx[0])
    torch.testing.assert_close(got, twin.adapt(manual[0][0], sy[0])(manual[2][0]))
    assert got.shape == (6, 3)


def test_normalize_overrides_the_weights_own_or_switches_it_off_and_plain_backbones_are_unchanged(tmp_path):
    path, _ = timm_file(tmp_path)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    custom = ProtoNet(pretrained(path), normalize=((0.1, 0.2, 0.3), 0.5))  # one std for every channel
    assert custom.hparams.normalize == [[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]]
    torch.testing.assert_close(custom.as_inputs(x), normalised(x, (0.1, 0.2, 0.3), (0.5,) * 3))
    off = ProtoNet(pretrained(path), normalize=None)
    assert off.hparams.normalize is None
    torch.testing.assert_close(off.as_inputs(x), x.float() / 255)
    # without pretrained weights nothing changes: [0, 1] inputs, as before
    for learner in (ProtoNet(Conv4(in_channels=3)), ProtoNet(timm_backbone("test_resnet"))):
        assert learner.hparams.normalize is None
        torch.testing.assert_close(learner.as_inputs(x), x.float() / 255)
    # on request for any backbone (a recipe's per-dataset statistics); one value for all channels of grey images
    grey = ProtoNet(Conv4(), normalize=(0.5, 0.25))
    torch.testing.assert_close(grey.as_inputs(x[:, :1]), (x[:, :1].float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize(("value", "match"), [
    ("imagenet", r"Expected `normalize` to be \(mean, std\), each a number or one number per input channel .* but "
                 r"got 'imagenet'"),
    ((0.5,), r"Expected `normalize` to be \(mean, std\).* but got \(0.5,\)"),
    (((0.5, 0.5, 0.5), (0.2, 0.2)), r"`normalize` has 3 means but 2 stds: give one per channel for both"),
    ((0.5, 0.0), r"`normalize` needs finite means and positive, finite stds"),
    (((0.5, "a"), 1.0), r"Expected `normalize` to be \(mean, std\)"),
])
def test_a_bad_normalize_is_refused_with_the_forms_it_takes(value, match):
    with pytest.raises(ValueError, match=match):
        ProtoNet(Conv4(), normalize=value)


def test_per_channel_statistics_on_images_of_another_channel_count_name_the_shapes():
    learner = ProtoNet(Conv4(), normalize=IMAGENET)
    with pytest.raises(ValueError, match=r"`normalize` has 3 channel means and stds, but `support_x` has shape "
                                         r"\(1, 3, 1, 28, 28\): expected images \[\.\.\., 3, H, W\].*normalize=None"):
        learner(tuple(t for t in (torch.zeros(1, 3, 1, 28, 28, dtype=torch.uint8), torch.arange(3)[None],
                                  torch.zeros(1, 3, 1, 28, 28, dtype=torch.uint8), torch.arange(3)[None])))


def test_a_backbone_pretrained_by_a_learner_carries_its_normalisation_to_the_next_learner(tmp_path):
    stats = ((0.47, 0.44, 0.40), (0.28, 0.27, 0.28))  # e.g. a dataset's own (MetaOptNet's, RFS's miniImageNet)
    pre = Pretrainer(Conv4(in_channels=3, hidden=8, image_size=16), num_classes=8, normalize=stats)
    fitter = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fitter.fit(pre, data(pretrain=True))
    assert input_normalization(pre.backbone) == stats
    assert ProtoNet(pre.backbone).hparams.normalize == [list(s) for s in stats]  # the module, passed on
    fitter.save_checkpoint(tmp_path / "pre.ckpt")
    body = Conv4(in_channels=3, hidden=8, image_size=16, pretrained=str(tmp_path / "pre.ckpt"))  # or its file
    assert ProtoNet(body).hparams.normalize == [list(s) for s in stats]
    assert ProtoNet(body, normalize=None).hparams.normalize is None


# ------------------------------------------------------------------------------------------------ reloading
RELOAD = """
import socket, sys, torch
def refuse(*args, **kwargs):
    raise OSError("this test has no network")
socket.socket.connect = socket.create_connection = refuse
from lightning_meta import MAML, ProtoNet
for name, cls in (("maml", MAML), ("protonet", ProtoNet)):
    saved = torch.load(f"{sys.argv[1]}/{name}.pt", weights_only=True)
    learner = cls.load_from_checkpoint(f"{sys.argv[1]}/{name}.ckpt", weights_only=True).eval()
    sx, sy, qx, qy = saved["batch"]
    torch.save({"outputs": learner(saved["batch"]), "adapted": learner.adapt(sx[0], sy[0])(qx[0]),
                "normalize": learner.hparams.normalize}, f"{sys.argv[1]}/{name}.out.pt")
"""


def test_a_pretrained_learner_reloads_in_a_process_with_no_network_and_no_weight_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    path, _ = timm_file(tmp_path)
    tv_file, _ = torchvision_file(tmp_path / "home")
    torch.manual_seed(0)
    learners = {"maml": MAML(pretrained(path, num_classes=3), inner_lr=0.05, inner_steps=1, first_order=True),
                "protonet": ProtoNet(torchvision_backbone("shufflenet_v2_x0_5", weights="IMAGENET1K_V1"))}
    batch = next(iter(data().test_dataloader()))
    for name, learner in learners.items():
        fitter = trainer(tmp_path, max_steps=1)
        fitter.fit(learner, data())
        fitter.save_checkpoint(tmp_path / f"{name}.ckpt")
        learner.eval()
        sx, sy, qx, _ = batch
        torch.save({"batch": tuple(batch), "outputs": learner(batch), "adapted": learner.adapt(sx[0], sy[0])(qx[0])},
                   tmp_path / f"{name}.pt")
    path.unlink(), tv_file.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "empty"),
           "PYTHONPATH": str(Path(lightning_meta.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "empty" / "hub").exists()  # nothing was fetched into the cache
    for name, normalize in (("maml", [list(MEAN), list(STD)]), ("protonet", [list(m) for m in IMAGENET])):
        want, got = torch.load(tmp_path / f"{name}.pt"), torch.load(tmp_path / f"{name}.out.pt")
        assert got["normalize"] == normalize
        torch.testing.assert_close(got["outputs"], want["outputs"])
        torch.testing.assert_close(got["adapted"], want["adapted"])


def test_the_cli_trains_a_pretrained_timm_backbone_and_predicts_with_its_normalisation_once(tmp_path):
    path, _ = timm_file(tmp_path)
    backbone = {"class_path": "lightning_meta.models.timm_backbone",
                "init_args": {"model_name": "test_resnet", "pretrained": True},
                "dict_kwargs": {"in_chans": 1, "pretrained_cfg_overlay": {"file": str(path)}}}
    common = ["--model=lightning_meta.ProtoNet", f"--model.init_args.backbone={json.dumps(backbone)}",
              *(f"--data.{split}=lightning_meta.data.SyntheticGlyphs" for split in ("train", "val", "test")),
              "--data.train.init_args.num_classes=10", "--data.val.init_args.split=val",
              "--data.val.init_args.num_classes=5", "--data.test.init_args.split=test",
              "--data.test.init_args.num_classes=5", "--data.n_way=3", "--data.n_shot=1", "--data.n_query=2",
              "--data.meta_batch_size=2", "--data.train_episodes=2", "--data.val_episodes=2", "--data.test_episodes=2",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    fit = run(["fit", *common, "--trainer.max_steps=1"])
    assert fit.model.hparams.normalize == [[0.5], [0.5]]  # test_resnet's (0.5, 0.5, 0.5), for one channel
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["normalize"] == [[0.5], [0.5]]
    predicted = run(["predict", *common, f"--ckpt_path={ckpt}"])
    written = torch.load(predicted.prediction_writer.path, weights_only=True)["predictions"][0]
    twin = ProtoNet.load_from_checkpoint(ckpt, normalize=None).eval()  # on inputs normalised by hand
    sx, sy, qx, qy = next(iter(fit.datamodule.test_dataloader()))
    torch.testing.assert_close(written, twin((normalised(sx, (0.5,), (0.5,)), sy, normalised(qx, (0.5,), (0.5,)), qy)))
