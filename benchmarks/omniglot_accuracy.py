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

Recipes (``examples/configs/recipes/*.yaml``) describe a whole run, a pretraining stage included:

    python benchmarks/omniglot_accuracy.py --recipe examples/configs/recipes/omniglot_protonet.yaml --checkpoint out.ckpt
    python benchmarks/omniglot_accuracy.py --recipe ... --curve 200     # + 5-way accuracy every 200 steps (untimed)

A recipe is ``stages:``, a list run in order, each with ``model`` (a class path and its ``init_args``, as in a
LightningCLI config), ``data`` (EpisodicDataModule options; the datasets are this script's honest split) and
``trainer`` (Trainer options, e.g. ``max_steps``). Every stage after the first starts its backbone from the
previous stage's checkpoint (``pretrained=``, as a second CLI call would), unless it says ``from_previous: false``.
The last line printed is the 5-way figure; ``--checkpoint`` saves the trained learner, which
``LearnerClass.load_from_checkpoint(path)`` restores with nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml
from timing import Stopwatch

from lightning_meta import ANIL, MAML, AttentionLearner, EpisodeMean, EpisodicDataModule, ProtoNet
from lightning_meta.data import Omniglot, RandomAffine, RandomShift
from lightning_meta.functional import episode_accuracy
from lightning_meta.models import Conv4

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
UNSEEN = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


def augmentation(args):
    """The training transform the flags ask for (RandomShift, RandomAffine, or the one then the other)."""
    chosen = ([RandomShift(args.shift)] if args.shift else []) + ([RandomAffine()] if args.affine else [])
    if len(chosen) < 2:
        return chosen[0] if chosen else None
    return lambda x, g: chosen[1](chosen[0](x, g), g)


def instantiate(spec):
    """Build ``{"class_path": ..., "init_args": {...}}`` specs (nested ones too), as a LightningCLI config does."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


class Curve(L.Callback):
    """Every ``every`` training steps: stop the clock, test 5-way 1-shot on ``episodes`` unseen-alphabet episodes,
    print the point, restart the clock."""

    def __init__(self, clock: Stopwatch, every: int, test, episodes: int, stage: str) -> None:
        self.clock, self.every, self.stage = clock, every, stage
        self.dm = EpisodicDataModule(None, None, test, n_way=5, n_shot=1, n_query=15, eval_meta_batch_size=10,
                                     test_episodes=episodes, seed=1)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            return
        self.clock.stop()
        accuracy = EpisodeMean()  # the interval the learners log
        with module.evaluating():  # (the MAML family adapts with gradients inside)
            for ep in self.dm.test_dataloader():
                accuracy.update(episode_accuracy(module(ep.to(module.device)), ep.query_y.to(module.device)).cpu())
        mean, ci95 = accuracy.compute()
        print(f"curve: {self.stage} step {trainer.global_step}, {self.clock.wall / 60:.2f} train wall-min, "
              f"{self.clock.cpu / 60:.2f} CPU-min: 5-way {100 * mean:.2f}% +- {100 * ci95:.2f}% "
              f"({int(accuracy.count)} episodes)", flush=True)
        self.clock.start()


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def run_recipe(args, train, val, test, clock: Stopwatch):
    """Train every stage of the recipe in order; returns the last stage's learner and trainer."""
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    if not stages:
        raise SystemExit(f"{args.recipe}: a recipe needs `stages:`, a list of {{model, data, trainer}} (see --help)")
    previous, workdir = None, Path(tempfile.mkdtemp(prefix="recipe-"))
    for i, stage in enumerate(stages):
        model_spec = stage["model"]
        if previous is not None and stage.get("from_previous", True):
            backbone = model_spec["init_args"]["backbone"]
            backbone.setdefault("init_args", {})["pretrained"] = str(previous)
        model = instantiate(model_spec)
        data = {"n_way": 5, "n_shot": 1, "n_query": 15, "val_episodes": 100, "seed": 0, **instantiate(stage.get("data", {}))}
        dm = EpisodicDataModule(train, val, None, **data)
        options = {"num_sanity_val_steps": 0, "limit_val_batches": 0, "max_epochs": 10_000,
                   "accelerator": args.accelerator, "precision": args.precision, **stage.get("trainer", {})}
        if args.limit_steps:
            options["max_steps"] = min(options.get("max_steps", args.limit_steps), args.limit_steps)
        name = stage.get("name", f"stage {i + 1}")
        callbacks = [Curve(clock, args.curve, test, args.curve_episodes, name)] if args.curve else []
        trainer = quiet_trainer(callbacks=callbacks, **options)
        clock.start()
        trainer.fit(model, dm)
        clock.stop()
        print(f"{name}: {type(model).__name__}, {trainer.global_step} steps ({trainer.current_epoch} epochs), "
              f"{clock.wall / 60:.1f} wall-min / {clock.cpu / 60:.1f} CPU-min so far", flush=True)
        if i + 1 < len(stages):  # the next stage starts from it
            previous = workdir / f"stage{i}.ckpt"
            trainer.save_checkpoint(previous)
    return model, trainer


def evaluate(model, train, test, args) -> None:
    """5-way and 20-way 1-shot (MAML family: 5-way, in both batch-norm modes) on the unseen alphabets; the 5-way
    figure of the mode it was trained in last."""
    maml_family = hasattr(model, "batch_norm")
    trained = getattr(model, "batch_norm", None)
    modes = (trained, "transductive" if trained == "support" else "support") if maml_family else (None,)
    lines = []
    for mode in modes:
        if mode is not None:
            model.batch_norm = mode
        for n_way in (5,) if maml_family else (5, 20):
            tdm = EpisodicDataModule(train, None, test, n_way=n_way, n_shot=1, n_query=15, meta_batch_size=1,
                                     eval_meta_batch_size=4, test_episodes=args.test_episodes, seed=0)
            res = quiet_trainer(accelerator=args.accelerator, precision=args.precision).test(model, tdm, verbose=False)[0]
            tested = f", tested with batch_norm={mode}" if mode else ""
            lines.append(f"  {n_way}-way 1-shot on {args.test_episodes} episodes of unseen alphabets{tested}: "
                         f"{100 * res['test/acc']:.2f}% +- {100 * res['test/acc_ci95']:.2f}%")
    if trained is not None:
        model.batch_norm = trained
    print("\n".join(lines[1:] + lines[:1]))  # the last line: 5-way, as trained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="a recipe file (examples/configs/recipes/): replaces the flags below "
                   "that choose the learner, its data and its budget")
    p.add_argument("--checkpoint", default=None, help="save the trained learner here (load_from_checkpoint restores it)")
    p.add_argument("--curve", type=int, default=0, metavar="STEPS",
                   help="print 5-way accuracy every STEPS training steps of each stage (not counted in the time)")
    p.add_argument("--curve-episodes", type=int, default=200, help="episodes of each --curve point")
    p.add_argument("--limit-steps", type=int, default=None,
                   help="cap every stage at this many steps (to check that a recipe runs; its figures mean nothing)")
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
    clock = Stopwatch()
    if args.recipe:
        model, trainer = run_recipe(args, train, val, test, clock)
        described = f"recipe {args.recipe}"
    else:
        model, trainer, described = run_flags(args, train, val, test, clock)
    print(f"{type(model).__name__}: trained in {clock.wall / 60:.1f} min wall, {clock.cpu / 60:.1f} CPU-min on "
          f"{torch.get_num_threads()} threads ({args.accelerator}, {args.precision}; {described})", flush=True)
    if args.checkpoint:
        trainer.save_checkpoint(args.checkpoint)
        print(f"saved {args.checkpoint}: {type(model).__name__}.load_from_checkpoint({args.checkpoint!r})")
    evaluate(model, train, test, args)


def run_flags(args, train, val, test, clock: Stopwatch):
    """The learner, data and budget the flags describe (the README's earlier figures)."""
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
    callbacks = [Curve(clock, args.curve, test, args.curve_episodes, args.learner)] if args.curve else []
    trainer = quiet_trainer(**budget, max_epochs=10_000, accelerator=args.accelerator, precision=args.precision,
                            callbacks=callbacks)
    clock.start()
    trainer.fit(model, dm)
    clock.stop()
    described = (f"{trainer.global_step} meta-steps, {trainer.current_epoch} epochs; {way}-way 1-shot {query}-query, "
                 f"meta-batch {batch}, shift {args.shift}, affine {args.affine}"
                 + (f", batch_norm={args.batch_norm}" if hasattr(model, "batch_norm") else ""))
    return model, trainer, described


if __name__ == "__main__":
    main()
