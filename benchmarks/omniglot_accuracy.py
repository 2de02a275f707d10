"""Few-shot accuracy on real Omniglot: meta-train on images_background_small1 (28x28, rotations as classes), test on
the alphabets of images_background_small2 that small1 lacks (Japanese (katakana), Sanskrit, Tagalog), 600 episodes
each of 5-way 1-shot and 20-way 1-shot, with 95% intervals and the CPU time of training.

    python benchmarks/omniglot_accuracy.py --learner protonet --minutes 8
    python benchmarks/omniglot_accuracy.py --learner protonet --steps 1500 --lr 3e-3   # cosine decay over 1500 steps
    python benchmarks/omniglot_accuracy.py --learner attention --minutes 10
    python benchmarks/omniglot_accuracy.py --learner maml --minutes 10
    python benchmarks/omniglot_accuracy.py --learner anil --minutes 5 --batch-norm transductive

MAML-family learners train with ``--batch-norm`` (``support``: queries normalised with their task's support
statistics, the library's default; ``transductive``: with the query batch's own) and are tested in both modes.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import lightning as L
import torch

from lightning_meta import ANIL, MAML, AttentionLearner, EpisodicDataModule, ProtoNet
from lightning_meta.data import Omniglot, RandomAffine, RandomShift
from lightning_meta.models import Conv4

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
UNSEEN = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def augmentation(args):
    """The training transform the flags ask for (RandomShift, RandomAffine, or the one then the other)."""
    chosen = ([RandomShift(args.shift)] if args.shift else []) + ([RandomAffine()] if args.affine else [])
    if len(chosen) < 2:
        return chosen[0] if chosen else None
    return lambda x, g: chosen[1](chosen[0](x, g), g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learner", choices=["protonet", "attention", "maml", "anil"], default="protonet")
    p.add_argument("--batch-norm", choices=["support", "transductive"], default="support",
                   help="MAML family: how batch norm normalises the queries in training (both are tested)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--root", default=str(ROOT))
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--lr", type=float, default=None, help="outer learning rate (default: the learner's)")
    p.add_argument("--steps", type=int, default=None,
                   help="train for this many meta-steps with cosine decay instead of a time budget")
    p.add_argument("--accelerator", default="cpu", help="cpu (the figures in the README) or cuda")
    p.add_argument("--precision", default="32-true", help="e.g. 16-mixed or bf16-mixed")
    p.add_argument("--train-way", type=int, default=None, help="ways of a training episode (default: the learner's)")
    p.add_argument("--train-query", type=int, default=None, help="queries per class in training")
    p.add_argument("--meta-batch", type=int, default=None, help="episodes per meta-step")
    p.add_argument("--shift", type=int, default=0, help="augment training images: RandomShift(max_shift=SHIFT)")
    p.add_argument("--affine", action="store_true",
                   help="augment training images with RandomAffine() (rotation, translation, scale, shear)")
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    rot = (0, 90, 180, 270)
    train = Omniglot(args.root, ["images_background_small1"], rotations=rot, split="train", split_fractions=(0.9, 0.1, 0))
    val = Omniglot(args.root, ["images_background_small1"], split="val", split_fractions=(0.9, 0.1, 0))
    test = Omniglot(args.root, ["images_background_small2"], alphabets=UNSEEN)
    if args.learner == "protonet":
        model, way, shot, query, batch = ProtoNet(Conv4(), lr=1e-3), 60, 1, 5, 1
    elif args.learner == "attention":
        model = AttentionLearner(Conv4(), max_way=60, dim=128, depth=2, heads=4, lr=5e-4)
        way, shot, query, batch = 20, 1, 5, 4
    else:
        cls = MAML if args.learner == "maml" else ANIL
        model = cls(Conv4(out_features=5), inner_lr=0.4, inner_steps=1, eval_inner_steps=3, lr=1e-3,
                    batch_norm=args.batch_norm)
        way, shot, query, batch = 5, 1, 15, 16
    way, query, batch = args.train_way or way, args.train_query or query, args.meta_batch or batch
    if args.lr is not None:
        model.hparams.lr = args.lr
    if args.steps:
        model.hparams.lr_scheduler = "cosine"
    dm = EpisodicDataModule(train, val, None, n_way=5, n_shot=1, n_query=15, train_way=way, train_shot=shot,
                            train_query=query, meta_batch_size=batch, train_episodes=200 * batch, val_episodes=100,
                            seed=0, train_transform=augmentation(args))
    budget = {"max_steps": args.steps} if args.steps else {"max_time": {"minutes": args.minutes}}
    trainer = L.Trainer(**budget, max_epochs=10_000, logger=False, accelerator=args.accelerator,
                        precision=args.precision,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    wall, cpu = time.perf_counter(), cpu_seconds()
    trainer.fit(model, dm)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    print(f"{args.learner}: trained {trainer.global_step} meta-steps ({trainer.current_epoch} epochs) in "
          f"{wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min on {torch.get_num_threads()} threads "
          f"({args.accelerator}, {args.precision}; {way}-way 1-shot {query}-query, meta-batch {batch}, "
          f"shift {args.shift}, affine {args.affine}"
          + (f", batch_norm={args.batch_norm}" if hasattr(model, "batch_norm") else "") + ")")
    maml_family = hasattr(model, "batch_norm")
    modes = (args.batch_norm, "transductive" if args.batch_norm == "support" else "support") if maml_family else (None,)
    for mode in modes:
        if mode is not None:
            model.batch_norm = mode
        for n_way in (5,) if maml_family else (5, 20):
            tdm = EpisodicDataModule(train, None, test, n_way=n_way, n_shot=1, n_query=15, meta_batch_size=1,
                                     eval_meta_batch_size=4, test_episodes=args.test_episodes, seed=0)
            res = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator=args.accelerator, precision=args.precision).test(model, tdm, verbose=False)[0]
            tested = f", tested with batch_norm={mode}" if mode else ""
            print(f"  {n_way}-way 1-shot on {args.test_episodes} episodes of unseen alphabets{tested}: "
                  f"{100 * res['test/acc']:.2f}% +- {100 * res['test/acc_ci95']:.2f}%")


if __name__ == "__main__":
    main()
