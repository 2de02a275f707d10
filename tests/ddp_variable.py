"""Variable episodes under DDP, run on tests/ddp_run.py's forked ranks for test_variable_training.py, or as a command
of its own (Lightning's `ddp` launcher re-executes this file for rank 1):

    python tests/ddp_variable.py OUT_DIR DEVICES META_BATCH

Trains ProtoNet and Proto-MAML for two steps on variable episodes from two sources, recording per rank the ragged
meta-batches each step drew (their inputs and task sizes) and the meta-gradient after the first backward (after DDP's
all-reduce), then validates on two named sets; everything into OUT_DIR/rank{R}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import blobs  # noqa: E402

from lightning_meta import MAML, EpisodicDataModule, ProtoNet, VariableEpisodes  # noqa: E402
from lightning_meta.models import MLP  # noqa: E402

RULES = VariableEpisodes(min_way=3, max_way=6, max_query=3, max_support=20, max_support_per_class=5)


def data(meta_batch: int) -> EpisodicDataModule:
    return EpisodicDataModule(
        train={"a": blobs(num_classes=12, per_class=10, seed=0, prefix="a"),
               "b": blobs(num_classes=10, per_class=8, seed=1, prefix="b")},
        val={"x": blobs(num_classes=8, per_class=8, seed=2, prefix="x"), "y": blobs(num_classes=8, seed=3, prefix="y")},
        n_way=None, n_shot=None, n_query=None, variable_episodes=RULES, meta_batch_size=meta_batch,
        train_episodes=8, val_episodes=8, eval_meta_batch_size=2, seed=5)


class Recorder(L.Callback):
    def __init__(self):
        self.batches, self.grads = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append((batch.support_x.clone(), batch.support_sizes, batch.query_sizes, batch.ways))

    def on_after_backward(self, trainer, module):
        if self.grads is None:
            self.grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]


def run(out: Path, devices: int, meta_batch: int) -> None:
    kw = dict(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    if devices > 1:
        kw["strategy"] = "ddp"
    record = {}
    for name, build in (("protonet", lambda: ProtoNet(MLP(8, (16,)), lr=3e-3)),
                        ("protomaml", lambda: MAML(MLP(8, (16,), RULES.max_way), inner_lr=0.3, head_init="prototypes",
                                                   lr=3e-3))):
        L.seed_everything(0, verbose=False)
        learner, rec = build(), Recorder()
        trainer = L.Trainer(callbacks=[rec], max_steps=2, limit_val_batches=0, **kw)
        trainer.fit(learner, data(meta_batch))
        record[name] = {"batches": rec.batches, "grads": rec.grads}
        record[f"{name}_val"] = L.Trainer(**kw).validate(learner, data(meta_batch), verbose=False)
    torch.save(record, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
