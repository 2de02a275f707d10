"""The ``lightning-meta`` command: LightningCLI over every learner and the episodic data module.

    lightning-meta fit --config examples/configs/protonet_glyphs.yaml
    lightning-meta test --config examples/configs/protonet_glyphs.yaml --ckpt_path runs/.../last.ckpt
    lightning-meta predict --config examples/configs/protonet_glyphs.yaml --ckpt_path runs/.../last.ckpt

``predict`` writes the query outputs of every test episode to ``predictions.pt`` in the run's log folder (or
``--trainer.default_root_dir`` without a logger) and prints where.

Learners (``--model``), backbones and datasets are chosen by class path; ``--print_config`` shows every option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_meta.checkpoint import read_checkpoint
from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.learners.base import MetaLearner


class PredictionWriter(BasePredictionWriter):
    """Writes a predict run's outputs to ``<log dir>/predictions.pt`` (``predictions_rank<R>.pt`` per process under
    DDP): ``{"predictions": [one [B, M, N] logits tensor (or regression predictions) per meta-batch],
    "batch_indices": [the episode indices of each]}``, to read back with ``torch.load``. With named test sets
    (``data.test`` a dict) both are dicts of such lists by set name."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.path: Optional[Path] = None

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        root = Path(trainer.log_dir or trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        name = f"predictions_rank{trainer.global_rank}.pt" if trainer.world_size > 1 else "predictions.pt"
        self.path = root / name
        loaders = trainer.predict_dataloaders
        if isinstance(loaders, dict):  # named sets: Lightning gives one list per loader, in the dict's order
            predictions, batch_indices = (dict(zip(loaders, lists)) for lists in (predictions, batch_indices))
        torch.save({"predictions": predictions, "batch_indices": batch_indices}, self.path)


class MetaCLI(LightningCLI):
    """LightningCLI with learners chosen by class path and the episodic data module's shot/way linked to nothing else:
    every option stays explicit in the config."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads `--ckpt_path` itself (for its hyperparameters) before any learner code runs: read it
        # first through read_checkpoint, so a broken file or a refused type is named as the learners name it
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            read_checkpoint(path, map_location="cpu", weights_only=True)
        super()._parse_ckpt_path()

    def before_predict(self) -> None:
        self.prediction_writer = PredictionWriter()
        self.trainer.callbacks.append(self.prediction_writer)  # type: ignore[attr-defined]

    def after_predict(self) -> None:
        if self.prediction_writer.path is not None:
            rank_zero_info(f"Predictions written to {self.prediction_writer.path}")


def run(args=None) -> MetaCLI:
    """Run the command line ``args`` (default: ``sys.argv``) and return the CLI, whose ``trainer`` and ``model``
    hold the run's results."""
    return MetaCLI(
        MetaLearner,
        EpisodicDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args=None) -> int:
    """The ``lightning-meta`` console script: exit status 0 after a successful run (an error exits non-zero)."""
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
