"""Use 3: log a meta-training run to Weights & Biases, with adaptation curves and episode grids as images.

    python examples/wandb_logging.py                 # online: needs `wandb login`
    python examples/wandb_logging.py --offline       # writes the run to ./wandb; `wandb sync` uploads it later
"""

from __future__ import annotations

import argparse
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lightning_meta import MAML, EpisodicDataModule
from lightning_meta.callbacks import AdaptationCurve, EpisodeGrid
from lightning_meta.data import SyntheticGlyphs
from lightning_meta.models import Conv4


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", action="store_true")
    p.add_argument("--project", default="lightning-meta")
    p.add_argument("--save-dir", default=".")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args(argv)
    if args.offline:
        os.environ["WANDB_MODE"] = "offline"  # unlike WandbLogger(offline=True), this also keeps log_model working
    L.seed_everything(0)
    n = {"num_classes": 20, "samples_per_class": 6} if args.fast else {}
    data = EpisodicDataModule(SyntheticGlyphs("train", **n), SyntheticGlyphs("val", **n), n_way=5, n_shot=2, n_query=3,
                              meta_batch_size=4, train_episodes=16 if args.fast else 800, val_episodes=8 if args.fast else 100)
    model = MAML(Conv4(hidden=16 if args.fast else 64, out_features=5), inner_lr=0.4, inner_steps=1, eval_inner_steps=5)
    logger = WandbLogger(project=args.project, save_dir=args.save_dir, log_model=True)
    trainer = L.Trainer(max_epochs=1 if args.fast else 5, logger=logger, log_every_n_steps=1 if args.fast else 50,
                        callbacks=[AdaptationCurve(num_episodes=8), EpisodeGrid(num_episodes=2),
                                   ModelCheckpoint(monitor="val/acc", mode="max")])
    trainer.fit(model, data)
    run_dir = logger.experiment.dir
    print(f"W&B run: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
