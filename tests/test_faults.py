"""Faults: a SIGKILLed run resumes to the same result; checkpoints survive a kill during a save; broken checkpoints and
non-finite losses get clear errors."""

import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import blob_data, episode, trainer

from conftest import once_per_run
from lightning_meta import ProtoNet
from lightning_meta.models import MLP

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}


def run(*args, check=True):
    proc = subprocess.run([sys.executable, str(HERE / "kill_run.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


LEARNERS = ["protonet", "maml", "attention"]


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory):
    """Each learner's uninterrupted, killed and resumed runs, each its own process, from one launch (the imports paid
    once: kill_run.py forks them), once per test run."""
    return once_per_run("kill_runs", tmp_path_factory, lambda folder: run("all", folder / "runs", *LEARNERS)) / "runs"


@pytest.mark.parametrize("learner", LEARNERS)
def test_a_sigkilled_run_resumed_from_its_last_checkpoint_ends_exactly_like_an_uninterrupted_run(learner, kill_runs):
    out = kill_runs / learner
    status = json.loads((out / "status.json").read_text())
    assert status["full"]["returncode"] == 0, status["full"]["stderr"]
    # really killed by the signal, mid-epoch, before the end of its run
    assert status["kill"]["returncode"] == -signal.SIGKILL, status["kill"]["stderr"]
    assert not status["kill"]["result_saved"]
    assert status["resume"]["returncode"] == 0, status["resume"]["stderr"]
    full, resumed = torch.load(out / "full" / "result.pt"), torch.load(out / "cut" / "result.pt")
    assert full["step"] == resumed["step"] == 16
    assert full["state"].keys() == resumed["state"].keys()
    for name, value in full["state"].items():
        assert torch.equal(value, resumed["state"][name]), name
    assert full["metrics"] == resumed["metrics"] and "val/acc" in full["metrics"]


def save_forever(path, ready):
    from lightning_meta.checkpoint import CheckedCheckpointIO

    torch.set_num_threads(1)  # the parent's OpenMP threads are not in a forked child: a parallel torch op would hang
    io, i = CheckedCheckpointIO(), 0
    while True:
        i += 1
        io.save_checkpoint({"i": i, "w": torch.full((25_000_000,), float(i))}, path)
        os.write(ready, b"%d\n" % i)


def test_a_kill_during_a_checkpoint_save_never_leaves_a_file_that_loads_wrongly(tmp_path):
    from lightning_meta.checkpoint import read_checkpoint

    fork = multiprocessing.get_context("fork")  # each saver a process of its own, started in milliseconds
    for n, delay in enumerate((0.05, 0.2, 0.45)):
        read, ready = os.pipe()
        saver = fork.Process(target=save_forever, args=(tmp_path / f"last{n}.ckpt", ready))
        saver.start()
        os.close(ready)  # the saver's copy only: a saver that dies before its first save ends the read below
        if not select.select([read], [], [], 120)[0]:
            saver.kill()
        assert os.read(read, 64)  # one save completed (within 2 minutes)
        time.sleep(delay)  # now somewhere inside a later save (each writes 100 MB)
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        os.close(read)
        assert saver.exitcode == -signal.SIGKILL  # killed by the signal, mid-save
        ckpt = read_checkpoint(tmp_path / f"last{n}.ckpt")
        assert ckpt["i"] >= 1 and torch.equal(ckpt["w"], torch.full((25_000_000,), float(ckpt["i"])))


def _checkpoint(tmp_path):
    model = ProtoNet(MLP(8, (16,)))
    t = trainer(default_root_dir=tmp_path, limit_val_batches=0)
    t.fit(model, blob_data())
    path = tmp_path / "good.ckpt"
    t.save_checkpoint(path)
    return path


def test_a_truncated_or_corrupt_checkpoint_gets_an_error_naming_the_file(tmp_path):
    good = _checkpoint(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=rf"Cannot load the checkpoint {bad}: the file is corrupt or truncated"):
            ProtoNet.load_from_checkpoint(bad, backbone=MLP(8, (16,)))
        with pytest.raises(ValueError, match=rf"Cannot load the checkpoint {bad}"):
            trainer().fit(ProtoNet(MLP(8, (16,))), blob_data(), ckpt_path=bad)
    with pytest.raises(FileNotFoundError, match=r"Checkpoint file not found: .*missing.ckpt"):
        ProtoNet.load_from_checkpoint(tmp_path / "missing.ckpt", backbone=MLP(8, (16,)))


class NaNAfter(torch.nn.Module):
    """A backbone whose outputs turn NaN from its `at`-th training call on."""

    def __init__(self, at):
        super().__init__()
        self.net, self.at, self.calls = MLP(8, (16,)), at, 0

    def forward(self, x):
        self.calls += self.training
        out = self.net(x)
        return out * float("nan") if self.training and self.calls == self.at else out


def test_a_non_finite_meta_loss_stops_training_naming_the_step():
    model = ProtoNet(NaNAfter(at=3))
    with pytest.raises(FloatingPointError, match=r"meta-loss is nan at global step 2 \(epoch 0, batch 2\)"):
        trainer(limit_val_batches=0).fit(model, blob_data())


def test_skip_mode_warns_and_skips_the_non_finite_meta_batch_without_updating():
    import lightning as L

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = [p.detach().clone() for p in module.parameters()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 2:  # the meta-batch whose loss is NaN
                self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, module.parameters()))

    model, watch = ProtoNet(NaNAfter(at=3), nonfinite="skip"), Watch()
    with pytest.warns(UserWarning, match=r"Skipped meta-batch at global step 2: the meta-loss is nan"):
        trainer(limit_val_batches=0, callbacks=[watch]).fit(model, blob_data())
    assert watch.unchanged and all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_inputs_are_refused_before_the_step():
    ep = episode()
    ep.query_x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="Episode.query_x contains NaN"):
        ProtoNet(MLP(8, (16,))).training_step(ep, 0)
