"""The ``lightning-meta`` command: LightningCLI over every learner and the episodic data module.

    lightning-meta fit --config examples/configs/protonet_glyphs.yaml
    lightning-meta test --config examples/configs/protonet_glyphs.yaml --ckpt_path runs/.../last.ckpt

Learners (``--model``), backbones and datasets are chosen by class path; ``--print_config`` shows every option.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_meta.checkpoint import read_checkpoint
from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.learners.base import MetaLearner


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
