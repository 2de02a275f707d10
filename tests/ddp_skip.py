"""The non-finite policy under DDP, run on tests/ddp_run.py's forked ranks (`run_modes`), or as a command of its own
(Lightning's `ddp` launcher re-executes this file for rank 1):

    python tests/ddp_skip.py OUT_DIR MODE[,MODE...] DEVICES

DEVICES processes train a ProtoNet for 4 steps (meta-batch 4 in all); at step 1 only the last rank's meta-loss is NaN.
With MODE "skip" every rank must skip that step (no rank waits in an all-reduce another skipped), with "raise" every
rank must stop. MODE "accumulate" (and "accumulate_scaler", float16 with a gradient scaler) accumulates gradients
over 2 meta-batches for 3 steps with NaNs at batches 2 and 5. Writes OUT_DIR/rank{R}.pt with the steps taken, the
error and the final weights. MODE "few_eval" asks for validation with fewer evaluation meta-batches than processes,
which every rank must refuse at setup. Several modes run one after the other in one process (the process group paid
once), each writing OUT_DIR/MODE/rank{R}.pt; "raise" and "few_eval" end a command's launch (Lightning's launcher stops
the other ranks after an error), so there each goes last.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import blob_data  # noqa: E402

from lightning_meta import ProtoNet  # noqa: E402
from lightning_meta.models import MLP  # noqa: E402


class NaNOnLastRank(ProtoNet):
    """A ProtoNet whose meta-loss is NaN on the last rank only: at global step 1, or with accumulation at training
    batches 2 (the first of an accumulation window of 2) and 5 (the last of one, where the optimizer steps)."""

    nan_batches: tuple = ()

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def meta_loss(self, batch, outputs):
        loss = super().meta_loss(batch, outputs)
        when = self.batch_idx in self.nan_batches if self.nan_batches else self.trainer.global_step == 1
        if self.training and self.global_rank == self.trainer.world_size - 1 and when:
            return loss * float("nan")
        return loss


def run(out: Path, mode: str, devices: int) -> None:
    L.seed_everything(0, verbose=False)
    accumulate = mode.startswith("accumulate")
    model = NaNOnLastRank(MLP(8, (16,)), lr=3e-3,
                          nonfinite="raise" if mode == "few_eval" else "skip" if accumulate else mode)
    plugins = []
    if accumulate:
        model.nan_batches = (2, 5)
    if mode == "accumulate_scaler":  # float16 autocast with a gradient scaler, as 16-mixed on a GPU
        from lightning.pytorch.plugins import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=3 if accumulate else 4, accumulate_grad_batches=2 if accumulate else 1,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=plugins)
    error = None
    try:
        if mode == "few_eval":
            trainer.validate(model, blob_data(val_episodes=devices - 1, eval_meta_batch_size=1), verbose=False)
        else:
            trainer.fit(model, blob_data(meta_batch_size=4 // devices, train_episodes=4 * (6 if accumulate else 5)))
    except (FloatingPointError, ValueError) as err:
        error = str(err)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    torch.save({"global_step": trainer.global_step, "error": error, "scaler": scaler.state_dict() if scaler else None,
                "weights": [p.detach().clone() for p in model.parameters()]}, out / f"rank{trainer.global_rank}.pt")


def run_modes(out: Path, modes: str, devices: int) -> None:
    for name in modes.split(","):
        (out / name).mkdir(parents=True, exist_ok=True)
        run(out / name, name, devices)


if __name__ == "__main__":
    run_modes(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
