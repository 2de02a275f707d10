"""The ``lightning-meta`` command: LightningCLI over every learner and the episodic data module.

    lightning-meta fit --config examples/configs/protonet_glyphs.yaml
    lightning-meta test --config examples/configs/protonet_glyphs.yaml --ckpt_path runs/.../last.ckpt

Learners (``--model``), backbones and datasets are chosen by class path; ``--print_config`` shows every option.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.learners.base import MetaLearner


class MetaCLI(LightningCLI):
    """LightningCLI with learners chosen by class path and the episodic data module's shot/way linked to nothing else:
    every option stays explicit in the config."""


def main(args=None) -> MetaCLI:
    return MetaCLI(
        MetaLearner,
        EpisodicDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
