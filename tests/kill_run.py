"""Run by test_faults.py as its own process.

    python tests/kill_run.py LEARNER OUT MODE      MODE: full | kill | resume
    python tests/kill_run.py all OUT LEARNER...    each mode of each learner, in order, in forked processes

`full` trains 2 epochs; `kill` trains the same run and SIGKILLs its own process after global step 11 (mid-epoch 2,
a checkpoint saved after every step); `resume` continues the killed run from OUT/ckpt/last.ckpt. `full` and `resume`
save the final weights and metrics to OUT/result.pt. `all` runs, per learner, `full` in OUT/LEARNER/full, then `kill`
and `resume` in OUT/LEARNER/cut, each as its own process forked after the imports (see forking.py), and writes each
one's exit status, stderr and whether it saved a result to OUT/LEARNER/status.json.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from forking import run_forked  # noqa: E402
from helpers import blob_data  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_meta import MAML, AttentionLearner, ProtoNet  # noqa: E402
from lightning_meta.models import MLP  # noqa: E402

KILL_AFTER = 11


class Kill(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)


def build(learner: str):
    L.seed_everything(0, verbose=False)
    common = {"lr": 3e-3, "lr_scheduler": os.environ.get("SCHED", "cosine") or None}
    if learner == "protonet":
        return ProtoNet(MLP(8, (16,)), **common)
    if learner == "maml":
        return MAML(MLP(8, (16,), 3), inner_lr=0.3, inner_steps=2, per_step_lr=True, **common)
    return AttentionLearner(MLP(8, (16,)), max_way=5, dim=16, heads=2, dropout=0.1, **common)


def main(learner: str, out: Path, mode: str) -> None:
    model = build(learner)
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)]
    if mode == "kill":
        callbacks.append(Kill())
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    data = blob_data(meta_batch_size=2, train_episodes=16, val_episodes=6)
    trainer.fit(model, data, ckpt_path=out / "ckpt" / "last.ckpt" if mode == "resume" else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "metrics": metrics,
                "step": trainer.global_step}, out / "result.pt")


def all_modes(out: Path, learners: list[str]) -> None:
    for learner in learners:
        (out / learner).mkdir(parents=True)
        status = {}
        for mode, folder in (("full", "full"), ("kill", "cut"), ("resume", "cut")):
            done = run_forked(main, learner, out / learner / folder, mode, logs=out / learner / mode)
            status[mode] = {"returncode": done.returncode, "stderr": done.stderr[-3000:],
                            "result_saved": (out / learner / folder / "result.pt").exists()}
        (out / learner / "status.json").write_text(json.dumps(status))


if __name__ == "__main__":
    if sys.argv[1] == "all":
        all_modes(Path(sys.argv[2]), sys.argv[3:])
    else:
        main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
