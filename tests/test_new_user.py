"""What a new user meets first (issue #31, items 16-18): class identity across splits follows one rule for every
source; a backbone that does not fit the data is named at setup, before any step; `make demo` sets up only what the
demo needs; the CLI says where the checkpoint went and puts a dataset's own error first."""

import logging
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_meta import MAML, EpisodicDataModule, ProtoNet
from lightning_meta.cli import run
from lightning_meta.data import ClassFolder, TensorClassDataset
from lightning_meta.models import Conv4

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


# ------------------------------------------------------------------ item 16: class identity by name, never by number
def numbered(seed, classes=8, per_class=4, dim=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes * per_class, dim, generator=g), torch.arange(classes).repeat_interleave(per_class)


def test_splits_numbered_from_zero_are_not_sharing_classes_whatever_the_source():
    datasets = pytest.importorskip("datasets")
    args = dict(n_way=3, n_shot=1, n_query=1, meta_batch_size=1, train_episodes=2, val_episodes=2)
    # plain integer labels carry no names: each split numbers its own classes from 0
    EpisodicDataModule(train=TensorClassDataset(*numbered(0)), val=TensorClassDataset(*numbered(1)), **args).setup("fit")
    hf = [datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4), int(v)) for v in x[:, 0].abs().mul(40)],
                                      "label": y.tolist()}) for x, y in (numbered(0), numbered(1))]
    dm = EpisodicDataModule(train=hf[0], val=hf[1], **args)
    dm.setup("fit")
    assert dm.train.class_names is None and dm.train.num_classes == 8
    assert TensorClassDataset(*numbered(0)).class_names is None
    # names are identity: a ClassLabel's names (or string labels) shared by two splits are refused, naming the fix
    labelled = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcdefgh"))})
    named = [datasets.Dataset.from_dict(h.to_dict(), features=labelled) for h in hf]
    with pytest.raises(ValueError, match=r"train and val datasets share 8 classes \(e.g. a, b, c.*Give each split its "
                                         r"own classes.*distinct `class_names`"):
        EpisodicDataModule(train=named[0], val=named[1], **args).setup("fit")
    with pytest.raises(ValueError, match=r"share 8 classes \(e.g. 0, 1, 2"):
        strings = [TensorClassDataset(x, [str(int(v)) for v in y]) for x, y in (numbered(0), numbered(1))]
        EpisodicDataModule(train=strings[0], val=strings[1], **args).setup("fit")


# ------------------------------------------------------------------ item 17: a backbone that does not fit, at setup
def rgb_folders(root: Path, classes=6, per_class=3, side=64) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (side, side), (40 * c, 10 * i, 200)).save(root / f"class{c}" / f"{i}.png")
    return root


def fit_until_error(learner, data):
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    with pytest.raises(ValueError) as raised:
        trainer.fit(learner, data)
    assert trainer.global_step == 0  # stopped at setup, before the first training step
    return str(raised.value)


def test_a_backbone_for_other_images_is_named_at_setup_with_the_data_shape_and_the_fix(tmp_path):
    images = ClassFolder(rgb_folders(tmp_path / "rgb"), cache=False)
    data = EpisodicDataModule(train=images, n_way=3, n_shot=1, n_query=2, meta_batch_size=1, train_episodes=4)
    # 1-channel Conv4 on RGB 64 px images (was: "weight of size [64, 1, 3, 3], expected input[...] to have 1 channels")
    message = fit_until_error(ProtoNet(Conv4()), data)
    assert re.search(r"ProtoNet's backbone Conv4 does not fit the train data: an input of shape \(3, 64, 64\) fails "
                     r"in its forward .*to have 1 channels.*Conv4\(in_channels=3, image_size=64\)", message), message
    # the MAML head sized for 28 px (was: "mat1 and mat2 shapes cannot be multiplied")
    message = fit_until_error(MAML(Conv4(in_channels=3, out_features=3)), data)
    assert re.search(r"MAML's backbone Conv4 does not fit the train data: an input of shape \(3, 64, 64\).*mat1 and "
                     r"mat2.*Conv4\(image_size=64\)", message), message


def test_a_fitting_backbone_is_probed_without_touching_the_random_streams_and_vectors_are_checked_too():
    class Watch(L.Callback):
        def setup(self, trainer, pl_module, stage):  # runs after the data module's setup, before the learner's
            self.before = torch.get_rng_state(), np.random.get_state()[1].copy()

        def on_fit_start(self, trainer, pl_module):
            self.after = torch.get_rng_state(), np.random.get_state()[1].copy()

    x, y = numbered(0, classes=6)
    data = EpisodicDataModule(train=TensorClassDataset(x, y), n_way=3, n_shot=1, n_query=1, train_episodes=2)
    watch = Watch()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[watch])
    trainer.fit(ProtoNet(nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))), data)
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(watch.before, watch.after))
    # any backbone: the input's shape and the sentence to act on
    message = fit_until_error(ProtoNet(nn.Linear(7, 4)), data)
    assert re.search(r"ProtoNet's backbone Linear does not fit the train data: an input of shape \(5,\) fails in its "
                     r"forward .*Build it for inputs of shape \(5,\)", message), message


# ------------------------------------------------------------------ item 18: set-up and command-line friction
def dry_run(target, venv):
    """The commands `make <target>` would run for a `.venv` at ``venv`` (make's dry run)."""
    done = subprocess.run(["make", "-n", f"VENV={venv}", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_sets_up_only_what_the_demo_needs_and_make_test_the_rest(tmp_path):
    fresh = dry_run("demo", tmp_path / "venv")
    assert '".[vision]"' in fresh and "torch==2.14.1 torchvision==0.29.1" in fresh and "examples/demo.py" in fresh
    assert "[dev]" not in fresh and "learn2learn" not in fresh and "l2l" not in fresh
    # after `make demo`, `make test` installs the rest; after `make test`, `make demo` installs nothing
    stamp = subprocess.run("cat pyproject.toml Makefile | cksum", shell=True, cwd=ROOT, capture_output=True, text=True)
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / f".demo-{stamp.stdout.split()[0]}").touch()
    after_demo = dry_run("test", venv)
    assert '".[dev]"' in after_demo and "l2l" in after_demo and "pytest" in after_demo
    (venv / f".installed-{stamp.stdout.split()[0]}").touch()
    (venv / f".demo-{stamp.stdout.split()[0]}").unlink()
    after_test = dry_run("demo", venv)
    assert "pip" not in after_test and "examples/demo.py" in after_test


def test_fit_says_where_the_checkpoint_went_and_the_docstring_names_a_file_the_configs_write(tmp_path, monkeypatch,
                                                                                          caplog):
    import lightning_meta.cli as cli_module

    monkeypatch.chdir(tmp_path)
    # the module docstring's checkpoint path, e.g. runs/protonet_glyphs/version_0/checkpoints/last.ckpt
    documented = re.search(r"--ckpt_path (\S+\.ckpt)", cli_module.__doc__).group(1)
    assert "..." not in documented
    with caplog.at_level(logging.INFO):
        run(["fit", f"--config={CONFIGS / 'protonet_glyphs.yaml'}", "--trainer.max_steps=1", "--trainer.max_epochs=1",
             "--trainer.limit_val_batches=1", "--data.train.init_args.num_classes=30",
             "--data.val.init_args.num_classes=10", "--data.test.init_args.num_classes=10",
             "--model.init_args.backbone.init_args.hidden=8", *QUIET])
    assert (tmp_path / documented).is_file()
    said = [r.getMessage() for r in caplog.records if "Checkpoint" in r.getMessage()]
    assert said and str((tmp_path / documented).resolve()) in said[-1], said


@pytest.mark.parametrize(("config", "args", "message"), [
    ("protonet_glyphs", ["--data.train=lightning_meta.data.ClassFolder", "--data.train.root=missing_folder"],
     r"^ClassFolder root missing_folder does not exist or is not a folder"),
    ("maml_sinusoid", ["--data.val.init_args.amplitude=[5.0, 1.0]"],
     r"^Expected `amplitude` to be a \(low, high\) range with low <= high, but got \(5.0, 1.0\)"),
])
def test_a_dataset_error_under_the_cli_comes_first_not_inside_the_union_message(config, args, message, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message) as raised:
        run(["fit", f"--config={CONFIGS / config}.yaml", *args, *QUIET])
    assert "Union" not in str(raised.value)
