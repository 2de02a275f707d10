"""Use 2: distributed meta-training (DDP), on any number of GPUs or nodes, or on CPU processes.

The meta-batch splits across ranks: each rank draws `--global-meta-batch / world_size` tasks per step, and rank r at
step s takes global episodes (s*W + r)*B ... (s*W + r + 1)*B - 1. Keeping the global meta-batch fixed keeps the work,
the episodes and (up to float summation order) the results identical when the number of devices changes.

    python examples/distributed.py --accelerator cpu --devices 2 --fast          # 2 CPU processes (gloo), ~1 min
    python examples/distributed.py --accelerator cpu --devices 2                 # full: 1,000 steps at ~0.9/s on 2 CPU cores
    python examples/distributed.py --accelerator gpu --devices 8                 # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/distributed.py --accelerator gpu --devices 8 --num-nodes 2     # 2 nodes by torchrun
    srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 \\
        python examples/distributed.py --accelerator gpu --devices 8 --num-nodes 2   # SLURM (sbatch script)

With `--image-folder DIR` the episodes come from your images (`DIR/train/<class>/*`, `DIR/val/<class>/*`, resized to
`--image-size`): every process on a machine maps one decoded-image cache file (the first one there decodes it while
the others wait), so memory per process does not grow with the dataset. `--save-weights PATH` writes each process's
final weights to PATH.rank<R>.pt (the processes of a DDP run end with equal weights).
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch

from lightning_meta import MAML, EpisodicDataModule
from lightning_meta.data import ClassFolder, SyntheticGlyphs
from lightning_meta.models import Conv4


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--global-meta-batch", type=int, default=32)
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed or 16-mixed on GPUs")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--image-folder", default=None, help="train/ and val/ folders of class folders (default: glyphs)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--save-weights", default=None, help="write each process's final weights to PATH.rank<R>.pt")
    args = p.parse_args(argv)
    world = args.devices * args.num_nodes
    if args.global_meta_batch % world:
        raise SystemExit(f"--global-meta-batch {args.global_meta_batch} must be divisible by devices x nodes = {world}.")
    L.seed_everything(0)
    # every process needs at least one evaluation meta-batch: whole rounds of the global meta-batch
    val_episodes = math.ceil((8 if args.fast else 200) / args.global_meta_batch) * args.global_meta_batch
    small = {"num_classes": 30, "samples_per_class": 6} if args.fast else {}
    if args.image_folder:  # decoded once per machine into the shared cache (every process maps the same file)
        train = ClassFolder(f"{args.image_folder}/train", image_size=args.image_size, mode="L")
        val = ClassFolder(f"{args.image_folder}/val", image_size=args.image_size, mode="L")
    else:
        train = SyntheticGlyphs("train", **small)
        val = SyntheticGlyphs("val", **({"num_classes": 10, "samples_per_class": 6} if args.fast else {}))
    data = EpisodicDataModule(
        train=train, val=val,
        n_way=5, n_shot=1, n_query=5, meta_batch_size=args.global_meta_batch // world,
        train_episodes=args.global_meta_batch * (2 if args.fast else 100), val_episodes=val_episodes,
    )
    model = MAML(Conv4(hidden=16 if args.fast else 64, out_features=5), inner_lr=0.4, inner_steps=1, eval_inner_steps=3)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                        strategy="ddp" if world > 1 else "auto", precision=args.precision,
                        max_epochs=1 if args.fast else 10, logger=False, enable_checkpointing=not args.fast)
    trainer.fit(model, data)
    if args.save_weights:
        torch.save(model.state_dict(), f"{args.save_weights}.rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        print(f"world size {trainer.world_size}, {data.meta_batch_size} tasks per rank per step, "
              f"val/acc {float(trainer.callback_metrics['val/acc']):.3f}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # a clean exit: left to the interpreter's shutdown, gloo's threads once aborted a rank after a finished fit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
