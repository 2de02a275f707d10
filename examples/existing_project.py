"""Use 1: drop a meta-learner into an existing Lightning project.

Your own Trainer, callbacks and logger, your own backbone, your own labelled dataset: wrap the dataset in
EpisodicDataModule and pick a learner. Nothing else changes.

    python examples/existing_project.py            # a few CPU minutes
    python examples/existing_project.py --fast     # seconds (what the tests run)
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import Dataset

from lightning_meta import EpisodicDataModule, ProtoNet


class MyImages(Dataset):
    """Stands for your dataset: any map-style dataset of (x, label) with a `targets` (or `labels`) attribute, e.g.
    torchvision's ImageFolder. Here: noisy 16x16 patterns, one pattern per class."""

    def __init__(self, classes: int, per_class: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        patterns = torch.rand(classes, 1, 16, 16, generator=g)
        self.targets = torch.arange(classes).repeat_interleave(per_class).tolist()
        self.images = patterns.repeat_interleave(per_class, 0) + 0.3 * torch.randn(classes * per_class, 1, 16, 16,
                                                                                       generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


class MyBackbone(nn.Module):
    """Stands for your network: anything mapping a batch of inputs to embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten())

    def forward(self, x):
        return self.net(x)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", default="runs")
    args = p.parse_args(argv)
    L.seed_everything(0)
    # the only new lines: episodes from your datasets, and a learner around your backbone
    data = EpisodicDataModule(train=MyImages(40, 12, seed=0), val=MyImages(10, 12, seed=1), test=MyImages(10, 12, seed=2),
                              n_way=5, n_shot=1, n_query=5, meta_batch_size=4,
                              train_episodes=40 if args.fast else 800, val_episodes=20, test_episodes=100)
    model = ProtoNet(MyBackbone(), lr=1e-3, lr_scheduler="cosine")
    # your Trainer, callbacks and logger, unchanged
    trainer = L.Trainer(
        max_epochs=1 if args.fast else 5, logger=CSVLogger(args.out, name="existing_project"),
        callbacks=[ModelCheckpoint(monitor="val/acc", mode="max"), EarlyStopping(monitor="val/acc", mode="max", patience=3),
                   LearningRateMonitor()],
    )
    trainer.fit(model, data)
    result = trainer.test(model, data, ckpt_path="best", verbose=False)[0]
    print(f"5-way 1-shot: {100 * result['test/acc']:.1f}% +- {100 * result['test/acc_ci95']:.1f}%")
    return result


if __name__ == "__main__":
    main()
