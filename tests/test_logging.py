"""Logging: W&B offline (the run read back from disk), other loggers untouched, image callbacks with state."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from conftest import wandb_worker
from lightning_meta import MAML, EpisodicDataModule, ProtoNet
from lightning_meta.callbacks import AdaptationCurve, EpisodeGrid
from lightning_meta.data import SyntheticGlyphs
from lightning_meta.models import Conv4


def glyph_data():
    small = dict(samples_per_class=6, image_size=28)
    return EpisodicDataModule(SyntheticGlyphs("train", num_classes=12, **small),
                              SyntheticGlyphs("val", num_classes=6, **small), SyntheticGlyphs("test", num_classes=6, **small),
                              n_way=3, n_shot=2, n_query=2, meta_batch_size=2, train_episodes=8, val_episodes=4,
                              test_episodes=4)


def fit(model, logger, callbacks, epochs=2, ckpt_path=None, root=None):
    trainer = L.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                        log_every_n_steps=1)
    trainer.fit(model, glyph_data(), ckpt_path=ckpt_path)
    return trainer


def test_adaptation_curve_and_episode_grid_save_images_with_any_logger_and_survive_a_resume(tmp_path):
    curve, grid = AdaptationCurve(num_episodes=4), EpisodeGrid(num_episodes=1, max_queries=6)
    model = MAML(Conv4(hidden=8, out_features=3), inner_lr=0.4, inner_steps=1, eval_inner_steps=3)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(model, CSVLogger(tmp_path), [curve, grid, saver])
    log_dir = Path(trainer.log_dir)
    assert sorted(p.name for p in (log_dir / "adaptation").iterdir()) == ["epoch000.png", "epoch001.png"]
    assert len(grid.saved) == 2 and all(Path(p).stat().st_size > 1000 for p in grid.saved)
    point = curve.history[-1]
    assert [s for s, _ in point["shots"]] == [1, 2] and [t for t, _ in point["steps"]] == [0, 1, 2, 3]
    assert all(0 <= acc <= 1 for _, acc in point["shots"] + point["steps"])
    # resume: the callbacks' state comes back from the checkpoint and grows from there
    curve2, grid2 = AdaptationCurve(num_episodes=4), EpisodeGrid(num_episodes=1)
    fit(MAML(Conv4(hidden=8, out_features=3), inner_lr=0.4, eval_inner_steps=3), CSVLogger(tmp_path),
        [curve2, grid2, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], epochs=3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [p["epoch"] for p in curve2.history] == [0, 1, 2] and len(grid2.saved) == 3


def test_protonet_gets_a_shots_curve_without_inner_steps(tmp_path):
    curve = AdaptationCurve(num_episodes=2)
    fit(ProtoNet(Conv4(hidden=8)), False, [curve], epochs=1, root=tmp_path)
    assert curve.history[0]["steps"] == [] and len(curve.history[0]["shots"]) == 2
    assert (tmp_path / "adaptation" / "epoch000.png").is_file()


@wandb_worker
def test_wandb_offline_run_holds_hyperparameters_metrics_images_and_the_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from wandb_reader import artifacts, config, finished_run, history

    monkeypatch.setenv("WANDB_SILENT", "true")
    # WandbLogger(offline=True) refuses log_model; WANDB_MODE=offline keeps the run on disk and still records artifacts
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="lightning-meta-test", save_dir=str(tmp_path), log_model=True)
    model = ProtoNet(Conv4(hidden=8), lr=2e-3)
    trainer = fit(model, logger, [AdaptationCurve(num_episodes=2), ModelCheckpoint(monitor="val/acc", mode="max")])
    expected = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(model, glyph_data(), verbose=False)
    test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    logger.experiment.finish()  # this run, written to disk completely, whatever else this process runs
    run_file = finished_run(tmp_path)  # finish() may return before the service has flushed the file
    rows = history(run_file)
    logged = {k: v for row in rows for k, v in row.items()}
    for key in ("val/acc", "val/acc_ci95", "val/loss", "train/loss", "train/acc", "test/acc", "test/acc_ci95"):
        assert key in logged, key
    assert logged["val/acc"] == pytest.approx(expected["val/acc"])
    assert logged["test/acc"] == pytest.approx(test_metrics["test/acc"])
    assert logged["val/adaptation_curve/_type"].startswith("images")  # the image, stored as W&B media
    assert logged["val/adaptation_curve/filenames"][0].endswith(".png")
    cfg = config(run_file)
    assert cfg["lr"] == 2e-3 and cfg["distance"] == "euclidean"
    assert artifacts(run_file), "log_model=True records the checkpoint as an artifact"


def test_other_loggers_keep_working_without_wandb(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = fit(ProtoNet(Conv4(hidden=8)), [TensorBoardLogger(tmp_path), CSVLogger(tmp_path)],
                  [AdaptationCurve(num_episodes=2), EpisodeGrid(num_episodes=1)], epochs=1)
    assert list(tmp_path.rglob("events.out.tfevents.*")) and list(tmp_path.rglob("metrics.csv"))
    assert torch.isfinite(trainer.callback_metrics["val/acc"])
