"""Adaptation heads on one embedding: few-shot accuracy (95% intervals) and milliseconds per test episode of each head
(prototype, logistic regression, a fine-tuned linear head) for trained checkpoints, on the honest Omniglot split
(trained on images_background_small1, tested on the alphabets of images_background_small2 that small1 lacks).

    python benchmarks/omniglot_accuracy.py --recipe examples/configs/recipes/omniglot_protonet.yaml --checkpoint pn.ckpt
    python benchmarks/omniglot_accuracy.py --recipe examples/configs/recipes/omniglot_pretrain.yaml --checkpoint pre.ckpt
    python benchmarks/bench_heads.py pn.ckpt pre.ckpt

Each checkpoint is loaded with ``load_from_checkpoint(path)`` and evaluated with ``trainer.test`` on 600 fixed episodes
of 5-way 1-shot, 20-way 1-shot and 5-way 5-shot (15 queries per class) for each head; the time is the test run's wall
time over its episodes (embedding, fitting the head and classifying the queries; data included).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import lightning as L
import torch
from timing import Stopwatch

from lightning_meta import EpisodicDataModule
from lightning_meta.data import Omniglot

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
UNSEEN = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
SETTINGS = [(5, 1), (20, 1), (5, 5)]
HEADS = {"prototype": {}, "logistic": {}, "finetune": {"head_steps": 100, "head_lr": 0.01}}


def load(path: str):
    saved = torch.load(path, map_location="cpu", weights_only=False)
    module, _, name = saved["lightning_meta_learner"].rpartition(".")
    return getattr(importlib.import_module(module), name).load_from_checkpoint(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--root", default=str(ROOT))
    args = p.parse_args()
    test = Omniglot(args.root, ["images_background_small2"], alphabets=UNSEEN)
    print("| learner | head | " + " | ".join(f"{n}-way {k}-shot" for n, k in SETTINGS) + " | ms per episode |")
    print("|---|---|" + "---|" * (len(SETTINGS) + 1))
    for path in args.checkpoints:
        model = load(path)
        for head, options in HEADS.items():
            model.hparams.update(head=head, **options)
            cells, times = [], []
            for n_way, n_shot in SETTINGS:
                data = EpisodicDataModule(test=test, n_way=n_way, n_shot=n_shot, n_query=15, meta_batch_size=1,
                                          test_episodes=args.episodes, seed=0)
                trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                                    accelerator="cpu", devices=1)
                with Stopwatch() as clock:
                    trainer.test(model, data, verbose=False)
                times.append(clock.wall / args.episodes * 1e3)
                m = trainer.logged_metrics
                cells.append(f"{100 * float(m['test/acc']):.2f}% +- {100 * float(m['test/acc_ci95']):.2f}%")
            print(f"| {type(model).__name__} ({Path(path).name}) | {head} | " + " | ".join(cells) + " | "
                  + " / ".join(f"{t:.1f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
