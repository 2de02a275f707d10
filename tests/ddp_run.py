"""Run by test_ddp.py as its own command: Lightning's `ddp` launcher re-executes this file for rank 1.

    python tests/ddp_run.py OUT_DIR DEVICES META_BATCH

Records, per rank, the episodes each step drew, the meta-gradient after the first backward (after DDP's all-reduce),
the validation metrics and the smallest top-2 logit gap of its validation queries, into OUT_DIR/rank{R}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import blob_data, sine_data, top2_gap  # noqa: E402

from lightning_meta import MAML, AttentionLearner, ProtoNet  # noqa: E402
from lightning_meta.models import MLP  # noqa: E402


class Recorder(L.Callback):
    def __init__(self):
        self.batches, self.grads = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch.support_x.clone())

    def on_after_backward(self, trainer, module):
        if self.grads is None:
            params = module.backbone.parameters() if isinstance(module, MAML) else module.parameters()
            self.grads = [p.grad.clone() for p in params if p.grad is not None]


def run(out: Path, devices: int, meta_batch: int) -> None:
    kw = dict(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    if devices > 1:
        kw["strategy"] = "ddp"
    L.seed_everything(0, verbose=False)
    maml = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=2, lr=1e-3)
    rec = Recorder()
    trainer = L.Trainer(max_steps=3, callbacks=[rec], limit_val_batches=0, **kw)
    trainer.fit(maml, sine_data(meta_batch_size=meta_batch, train_episodes=8 * 3))
    L.seed_everything(0, verbose=False)  # the task loop: meta-gradients taken task by task
    streamed = MAML(MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=2, task_parallel="loop", lr=1e-3)
    streamed_rec = Recorder()
    L.Trainer(max_steps=3, callbacks=[streamed_rec], limit_val_batches=0, **kw).fit(
        streamed, sine_data(meta_batch_size=meta_batch, train_episodes=8 * 3))
    L.seed_everything(0, verbose=False)
    attention, att_rec = AttentionLearner(MLP(8, (16,)), max_way=5, dim=16, heads=2, lr=3e-3), Recorder()
    L.Trainer(max_steps=3, limit_val_batches=0, callbacks=[att_rec], **kw).fit(
        attention, blob_data(meta_batch_size=meta_batch, train_episodes=8 * 3))
    L.seed_everything(0, verbose=False)
    protonet = ProtoNet(MLP(8, (16,)), lr=3e-3)
    L.Trainer(max_steps=3, limit_val_batches=0, **kw).fit(
        protonet, blob_data(meta_batch_size=meta_batch, train_episodes=8 * 3))
    L.seed_everything(0, verbose=False)
    proto = ProtoNet(MLP(8, (16,)))
    val = blob_data(val_episodes=11, meta_batch_size=2)
    metrics = L.Trainer(**kw).validate(proto, val, verbose=False)[0]
    with torch.no_grad():  # how far this rank's validation queries are from a tie (top-2 logit gap)
        margin = min(float(top2_gap(proto.eval()(batch)).min()) for batch in val.val_dataloader())
    torch.save({"batches": rec.batches, "grads": rec.grads, "metrics": metrics, "val_margin": margin,
                "final": [p.detach().clone() for p in maml.backbone.parameters()],
                "attention_grads": att_rec.grads, "streamed_grads": streamed_rec.grads,
                "streamed_final": [p.detach().clone() for p in streamed.backbone.parameters()],
                "protonet": [p.detach().clone() for p in protonet.parameters()]},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
