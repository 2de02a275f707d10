"""Reproduce the MAML paper's sinusoid regression (Finn et al. 2017, section 5.1): MLP 40-40, K=10, 1 inner step of
0.01, Adam 1e-3, meta-batch 25; then 600 test tasks with K=5 support points, MSE on 100 query points after 1 and 10
inner steps, with 95% intervals (paper: 0.67 and 0.35 after 70,000 meta-steps), and the CPU time it took.

    python benchmarks/maml_sinusoid.py [--steps 70000] [--threads 1]

A 40-40 MLP is too small for intra-op threads: one thread trains 70,000 meta-steps in about 6 CPU-minutes, two
threads took about 32 CPU-minutes for the same steps. Beside each mean it prints the median, the worst test task and
how many tasks diverged: 10 inner steps at lr 0.01 blow up on one or two of the 600 test tasks for some trained
models and not for others (runs that differ only in floating-point details), and one such task dominates a mean.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from timing import Stopwatch

from lightning_meta import MAML, EpisodicDataModule
from lightning_meta.data import Sinusoid
from lightning_meta.functional import per_task_loss
from lightning_meta.models import MLP


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=70_000)
    p.add_argument("--weights", default="maml_sinusoid.pt", help="where the trained weights are saved")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--init", choices=["torch", "reference"], default="torch",
                   help="reference: weights ~ truncated normal (std 0.01), zero biases, as in Finn et al.'s code; "
                        "torch: PyTorch's default Linear initialization")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    model = MAML(MLP(1, (40, 40), 1, init=args.init), inner_lr=0.01, inner_steps=1, eval_inner_steps=1, lr=1e-3)
    train = EpisodicDataModule(train=Sinusoid(), n_way=1, n_shot=10, n_query=10, meta_batch_size=25,
                               train_episodes=25 * 1000, seed=0)
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with Stopwatch() as clock:
        trainer.fit(model, train)
    print(f"MAML sinusoid: {trainer.global_step} meta-steps in {clock.wall / 60:.1f} min wall, {clock.cpu / 60:.1f} CPU-min "
          f"on {torch.get_num_threads()} threads ({args.init} initialization)")
    torch.save(model.state_dict(), args.weights)
    test = EpisodicDataModule(test=Sinusoid(), n_way=1, n_shot=5, n_query=100, meta_batch_size=25, test_episodes=600,
                              seed=1)
    for steps in (1, 10):
        model.hparams.eval_inner_steps = steps
        res = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(model, test,
                                                                                                   verbose=False)[0]
        # a diverging inner loop is counted in test/diverged and left out of test/mse, never averaged in silently
        summary = f"test/mse {res['test/mse']:.3f} +- {res['test/mse_ci95']:.3f} ({int(res['test/diverged'])} diverged)"
        errors = task_errors(model, test)
        finite = errors[torch.isfinite(errors)]
        ci95 = 1.96 * finite.std() / len(finite) ** 0.5
        print(f"  K=5, {steps:2d} inner step(s), {len(errors)} test tasks: {summary}; median {errors.median():.3f}, "
              f"worst task {errors.max():.3g}; {len(errors) - len(finite)} task(s) diverged; over the "
              f"{len(finite)} finite tasks {finite.mean():.3f} +- {ci95:.3f}, without the worst "
              f"{finite.sort().values[:-1].mean():.3f}")


def task_errors(model: MAML, data: EpisodicDataModule) -> torch.Tensor:
    """The query MSE of every test task after ``model.eval_inner_steps`` inner steps; ``inf`` where its inner loop
    diverged (the learner's outputs for that task are NaN)."""
    data.setup("test")
    model.eval()
    errors = torch.cat([per_task_loss(model(b), b.query_y).detach() for b in data.test_dataloader()])
    return errors.nan_to_num(nan=float("inf"))


if __name__ == "__main__":
    main()
