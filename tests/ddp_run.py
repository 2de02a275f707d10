"""Every real-DDP case of the suite, from one command run once per test run (tests/conftest.py, `ddp_runs`):

    python tests/ddp_run.py OUT_DIR

imports torch, Lightning and ours once, then forks each case's processes (forking.py): its 2 DDP ranks (on CPU, gloo;
forked as a launcher such as torchrun starts them, so Lightning starts none) and, beside them, the one-process run
they must equal, each a process of its own. Each case writes OUT_DIR/CASE/rank{R}.pt per rank:

- ddp, single: `run` below, per rank the episodes each step drew, the meta-gradient after the first backward (after
  DDP's all-reduce), the validation metrics and the smallest top-2 logit gap of its validation queries (meta-batches
  of 4 per rank, and 8);
- variable_ddp, variable_single: ddp_variable.py's variable episodes (meta-batches of 2 per rank, and 4);
- skip2/MODE, skip1/MODE: ddp_skip.py's non-finite policy ("raise" and "few_eval" on 2 ranks only);
- metadataset: ddp_metadataset.py, both ranks opening one Meta-Dataset source (written first, in md_tree) with one
  cache folder (md_cache) at once, in both stores, and training on its encoded store (2 ranks only).

OUT_DIR/logs holds every process's output; the command fails, with the failures' stderr, when any process fails.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_metadataset  # noqa: E402
import ddp_skip  # noqa: E402
import ddp_variable  # noqa: E402
from forking import finished, run_forked, run_ranks, start_forked  # noqa: E402
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


def cases(out: Path) -> list[tuple]:
    """(name, job, its arguments on 2 ranks, on one process or None)."""
    modes = "skip,accumulate,accumulate_scaler"
    return [("fixed", run, (out / "ddp", 2, 4), (out / "single", 1, 8)),
            ("variable", ddp_variable.run, (out / "variable_ddp", 2, 2), (out / "variable_single", 1, 4)),
            ("skip", ddp_skip.run_modes, (out / "skip2", modes, 2), (out / "skip1", modes, 1)),
            ("raise", ddp_skip.run_modes, (out / "skip2", "raise", 2), None),
            ("few_eval", ddp_skip.run_modes, (out / "skip2", "few_eval", 2), None),
            ("metadataset", ddp_metadataset.run, (out / "md_tree", out / "md_cache", out / "metadataset"), None)]


def one_process_runs(todo: list[tuple], logs: Path) -> None:
    """Each one-process run in a process of its own, one after the other."""
    failures = []
    for name, job, args in todo:
        proc = run_forked(job, *args, logs=logs / f"{name}.single")
        if proc.returncode:
            failures.append(f"{name}, one process: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    if failures:
        sys.exit("\n\n".join(failures))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    logs = out / "logs"
    for folder in ("ddp", "single", "variable_ddp", "variable_single", "skip2", "skip1", "metadataset", "logs"):
        (out / folder).mkdir(parents=True)
    ddp_metadataset.write(out / "md_tree")
    todo = cases(out)
    single = start_forked(one_process_runs, [(name, job, one) for name, job, _, one in todo if one], logs,
                          logs=logs / "single")
    failures = []
    for name, job, ranks, _ in todo:
        for rank, proc in enumerate(run_ranks(job, *ranks, world_size=2, logs=logs / name)):
            if proc.returncode:
                failures.append(f"{name}, rank {rank}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    one = finished(single, os.waitpid(single, 0)[1], logs / "single")
    if one.returncode:
        failures.append(one.stderr[-6000:])
    if failures:
        sys.exit("\n\n".join(failures))
