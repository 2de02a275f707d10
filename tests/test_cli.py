"""The `lightning-meta` command (LightningCLI): every example config fits, resumes, tests from its checkpoint and
loads with `load_from_checkpoint` under weights-only loading; each subcommand exits 0 on success and non-zero on
failure as a real command; a misspelled key is named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_meta
from conftest import OMNIGLOT
from lightning_meta.cli import main, run

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SMALL_DATA = {  # shrink each config's data so a test run takes seconds
    "glyphs": ["--data.train.init_args.num_classes=30", "--data.val.init_args.num_classes=10",
               "--data.test.init_args.num_classes=10"],
    "sinusoid": [],
    # variable episodes from two sources (Omniglot alphabets and glyphs): ProtoNet and Proto-MAML; 60 training glyph
    # classes, not 400 (still more than max_way=50; drawing 400 classes' glyphs took 2 s of each of the 3 runs)
    "episodes": ["--model.init_args.backbone.init_args.hidden=8", "--data.val_episodes=2",
                 "--data.train.glyphs.init_args.num_classes=60"],
    "protomaml": ["--model.init_args.backbone.init_args.hidden=8", "--data.val_episodes=2",
                  "--data.train.glyphs.init_args.num_classes=60"],
    "omniglot": ["--model.init_args.backbone.init_args.hidden=8", "--data.train_way=5", "--data.val_episodes=4",
                 "--data.test.init_args.alphabets=[Tagalog]"],
}
EXTRA = {  # the DDP config runs on one process here (its 2-process run: examples/distributed.py in test_examples.py)
    "maml_ddp_glyphs": ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.accelerator=cpu",
                        "--model.init_args.backbone.init_args.hidden=8", "--data.meta_batch_size=2"],
    "maml_wandb_glyphs": ["--model.init_args.backbone.init_args.hidden=8"],
    # the README's recipe: training images shifted (the transform object must not break checkpoints)
    "protonet_glyphs": ["--data.train_transform=lightning_meta.data.RandomShift",
                        "--data.train_transform.max_shift=2", "--model.init_args.backbone.init_args.hidden=8"],
    "attention_glyphs": ["--model.init_args.backbone.init_args.hidden=8", "--model.init_args.dim=32"],
}
CONFIG_NAMES = ["protonet_glyphs", "attention_glyphs", "maml_sinusoid", "maml_ddp_glyphs", "maml_wandb_glyphs",
                "protonet_omniglot", "pretrain_omniglot", "variable_episodes", "variable_episodes_protomaml"]


def common_args(config, tmp_path):
    # 2 validation meta-batches: "1" would parse as 1.0, every batch (Trainer's annotation is float | int | None, float
    # first; an integral float above 1 counts batches), 100 of them for the glyph configs' 200 episodes
    kind = config.rsplit("_", 1)[1]
    return [f"--config={CONFIGS / config}.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
            *EXTRA.get(config, []), "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
            *SMALL_DATA[kind]]


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_every_example_config_fits_resumes_tests_and_loads_from_its_checkpoint(config, tmp_path, monkeypatch, request):
    if "wandb" in config:
        request.getfixturevalue("one_wandb_run_at_a_time")
    real_omniglot = config.endswith("_omniglot") or config.startswith("variable_")
    if real_omniglot and not (OMNIGLOT / "images_background_small1.zip").is_file():
        pytest.skip(f"real Omniglot zips not found in {OMNIGLOT}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the configs' relative data paths
    metric = "val/mse" if config.endswith("sinusoid") else "val/acc"
    common = common_args(config, tmp_path)
    cli = run(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    assert cli.trainer.global_step == 2 and metric in cli.trainer.callback_metrics
    ckpt = next(tmp_path.rglob("*.ckpt"))
    # resume: two more steps from the checkpoint, under torch's weights-only loading
    resumed = run(["fit", *common, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                   f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == 4
    # load_from_checkpoint with nothing but the path (the backbone is rebuilt from the checkpoint)
    learner_cls = type(cli.model)
    loaded = learner_cls.load_from_checkpoint(ckpt, weights_only=True)
    batch = next(iter(cli.datamodule.test_dataloader()))
    cli.model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    cli.model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(batch), cli.model(batch), atol=1e-5, rtol=1e-5)
    task = batch.task(0)
    assert loaded.adapt(task.support_x, task.support_y)(task.query_x).shape[0] == task.query_x.shape[0]
    tested = run(["test", *common, "--data.test_episodes=8", f"--ckpt_path={ckpt}"])
    assert metric.replace("val", "test") in tested.trainer.callback_metrics


def command(*args, cwd):
    script = Path(sys.executable).parent / "lightning-meta"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_meta.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(lightning_meta.__file__).parents[1])}
    return subprocess.run([*base, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def commands(cwd, **named):
    """Each named command line run as the console script (``sys.exit(main())``), each in a process of its own, from
    one launch (tests/cli_run.py forks them after the imports): ``{name: CompletedProcess}``."""
    env = {**os.environ, "PYTHONPATH": str(Path(lightning_meta.__file__).parents[1])}
    out = cwd / "commands.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "cli_run.py"), str(out),
                           *(f"{name}={json.dumps(args)}" for name, args in named.items())],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: subprocess.CompletedProcess(named[name], r["returncode"], r["stdout"], r["stderr"])
            for name, r in json.loads(out.read_text()).items()}


def test_each_subcommand_exits_zero_on_success_and_non_zero_on_failure(tmp_path):
    common = [f"--config={CONFIGS / 'maml_sinusoid'}.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.val_episodes=8",
              "--data.test_episodes=8"]
    fit = command("fit", *common, "--trainer.max_steps=2", cwd=tmp_path)  # the installed command itself
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "lightning_meta.cli.MetaCLI object" not in fit.stdout + fit.stderr
    ckpt = next(tmp_path.rglob("*.ckpt"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    ran = commands(tmp_path, **{sub: [sub, *common, f"--ckpt_path={ckpt}"] for sub in ("validate", "test", "predict")},
                   broken=["test", *common, f"--ckpt_path={broken}"], misspelled=["fit", *common, "--data.n_shots=5"])
    for sub in ("validate", "test", "predict"):
        assert ran[sub].returncode == 0, f"{sub}: {ran[sub].stderr[-3000:]}"
        assert "lightning_meta.cli.MetaCLI object" not in ran[sub].stdout + ran[sub].stderr
    # predict keeps its outputs where it says (before: exit 0 and nothing kept)
    done = ran["predict"]
    said = [line for line in (done.stdout + done.stderr).splitlines() if "Predictions written to" in line]
    assert len(said) == 1, done.stdout + done.stderr
    written = torch.load(said[0].split("Predictions written to ")[1].strip(), weights_only=True)
    assert sum(p.shape[0] for p in written["predictions"]) == 8  # the 8 test episodes, one row of predictions each
    assert all(p.dim() == 2 and torch.isfinite(p).all() for p in written["predictions"])  # [B, M] sine values
    failed = ran["broken"]
    assert failed.returncode != 0 and "corrupt or truncated" in failed.stderr
    misspelled = ran["misspelled"]
    assert misspelled.returncode != 0 and "n_shots" in misspelled.stderr


def test_main_returns_the_exit_status_for_the_console_script():
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS / 'protonet_omniglot.yaml'}", "--print_config"])
    assert exit_info.value.code == 0


def test_a_misspelled_config_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", f"--config={CONFIGS / 'protonet_glyphs.yaml'}", "--data.n_shots=5"])
    assert exit_info.value.code != 0
    assert "n_shots" in capsys.readouterr().err


def test_the_cli_takes_named_test_sets_and_logs_each_by_name(tmp_path):
    sets = {"near": {"class_path": "lightning_meta.data.SyntheticGlyphs",
                     "init_args": {"split": "test", "num_classes": 10, "samples_per_class": 20}},
            "far": {"class_path": "lightning_meta.data.SyntheticGlyphs",
                    "init_args": {"split": "test", "num_classes": 6, "samples_per_class": 20, "seed": 1}}}
    cli = run(["test", f"--config={CONFIGS / 'protonet_glyphs'}.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
               f"--data.test={json.dumps(sets)}", "--data.test_episodes=4", *SMALL_DATA["glyphs"][:2],
               "--trainer.enable_progress_bar=false", "--model.init_args.backbone.init_args.hidden=8"])
    logged = set(cli.trainer.logged_metrics)
    assert {"test/near/acc", "test/near/acc_ci95", "test/far/acc", "test/far/loss"} <= logged
    metrics = cli.trainer.logged_metrics  # beside the sets' figures, their mean (what `monitor="val/acc"` reads)
    assert float(metrics["test/acc"]) == pytest.approx((float(metrics["test/near/acc"]) + float(metrics["test/far/acc"])) / 2)
