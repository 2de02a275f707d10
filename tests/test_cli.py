"""The `lightning-meta` command (LightningCLI) runs every example config, and names a misspelled key."""

from pathlib import Path

import pytest

from lightning_meta.cli import main, run

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SMALL_DATA = {  # shrink each config's data so a test run takes seconds
    "glyphs": ["--data.train.init_args.num_classes=30", "--data.val.init_args.num_classes=10",
               "--data.test.init_args.num_classes=10"],
    "sinusoid": [],
    "omniglot": [],
}


EXTRA = {  # the DDP config runs on one process here (its 2-process run: examples/distributed.py in test_examples.py)
    "maml_ddp_glyphs": ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.accelerator=cpu",
                        "--model.init_args.backbone.init_args.hidden=8", "--data.meta_batch_size=2"],
    "maml_wandb_glyphs": ["--model.init_args.backbone.init_args.hidden=8"],
}


@pytest.mark.parametrize("config", ["protonet_glyphs", "attention_glyphs", "maml_sinusoid", "maml_ddp_glyphs",
                                    "maml_wandb_glyphs"])
def test_every_example_config_fits_and_tests_through_the_cli(config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    kind = config.rsplit("_", 1)[1]
    common = [f"--config={CONFIGS / config}.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *EXTRA.get(config, []),
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              "--trainer.enable_progress_bar=false", *SMALL_DATA[kind]]
    cli = run(["fit", *common])
    assert cli.trainer.global_step == 2
    metric = "val/mse" if kind == "sinusoid" else "val/acc"
    assert metric in cli.trainer.callback_metrics
    ckpt = next(tmp_path.rglob("*.ckpt"))
    cli = run(["test", *common, "--data.test_episodes=8", f"--ckpt_path={ckpt}"])
    assert metric.replace("val", "test") in cli.trainer.callback_metrics


def test_omniglot_config_parses(tmp_path):
    cli_args = ["fit", f"--config={CONFIGS / 'protonet_omniglot.yaml'}", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args)
    assert exit_info.value.code == 0


def test_a_misspelled_config_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS / 'protonet_glyphs.yaml'}", "--data.n_shots=5"])
    assert exit_info.value.code != 0
    assert "n_shots" in capsys.readouterr().err
