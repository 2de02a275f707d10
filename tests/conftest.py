import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lightning_meta.data import TensorClassDataset

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"

# the decoded-image cache of this test session (subprocesses inherit it), removed at the end: tests never touch the
# user's cache folder and always exercise a first build
CACHE = os.environ["LIGHTNING_META_CACHE"] = tempfile.mkdtemp(prefix="lightning-meta-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE, ignore_errors=True)


# the alphabets of images_background_small2 that images_background_small1 does not have
UNSEEN_ALPHABETS = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]

needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background_small1.zip").is_file(),
    reason=f"real Omniglot zips not found in {OMNIGLOT} (they live in the project's shared/ folder)",
)


def _shared_folder(tmp_path_factory) -> Path:
    """The base temporary folder of this test run, shared by its pytest-xdist workers (each has a folder inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def exclusive(name: str, tmp_path_factory):
    """Hold the lock ``name``, one for every process of this test run (pytest-xdist workers); yields the run's shared
    folder. (pytest-xdist's ``xdist_group`` cannot do this: under pytest 9 it leaves the groups unsent together.)"""
    folder = _shared_folder(tmp_path_factory)
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def once_per_run(name: str, tmp_path_factory, make) -> Path:
    """``make(folder)`` run once for the whole test run, by whichever worker asks first (the others wait for it), then
    the folder for every caller: a costly launch shared by tests that two workers run."""
    with exclusive(name, tmp_path_factory) as shared:
        folder = shared / name
        if not (folder / ".done").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """The folder of every real-DDP case of the suite (test_ddp.py, test_variable_training.py): tests/ddp_run.py's
    one launch, once per test run (its ranks and one-process runs forked after one import, instead of an interpreter
    and its imports for every rank and run)."""

    def launch(folder):
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(folder / "runs")],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-6000:]

    return once_per_run("ddp_runs", tmp_path_factory, launch) / "runs"


@pytest.fixture
def one_wandb_run_at_a_time(tmp_path_factory):
    """W&B runs written by two test processes at once (pytest-xdist workers) left one offline run file empty (its
    7-byte header) about one time in eight here, never in one process: the tests that write W&B runs take turns. (A
    loaded CI machine once read a run's file before wandb's service had flushed it, with the tests taking turns: the
    tests that read a run file wait for its exit record, wandb_reader.finished_run.)"""
    with exclusive("wandb", tmp_path_factory):
        yield


wandb_worker = pytest.mark.usefixtures("one_wandb_run_at_a_time")


def require_learn2learn():
    """learn2learn is a peer we compare against: skip without it, except in CI where its absence is a failure."""
    try:
        import learn2learn  # noqa: F401
    except Exception as err:  # ImportError, or a broken build
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"learn2learn is required in CI (make l2l installs it): {err}")
        pytest.skip(f"learn2learn is not installed ({err}); `make l2l` builds it")
    import learn2learn

    return learn2learn


def toy_dataset(num_classes=12, per_class=8, dim=6, seed=0, names_prefix=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_classes * per_class, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    names = [f"{names_prefix}{i}" for i in range(num_classes)] if names_prefix else None
    return TensorClassDataset(x, y, class_names=names)


def episode_key(x: torch.Tensor) -> tuple:
    """A fingerprint of an episode's inputs, to compare which episodes were drawn."""
    return tuple(round(float(v), 5) for v in x.flatten(1).sum(1).tolist()[:8])


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """A W&B run left open by one test would be reused by the next WandbLogger (Lightning reuses `wandb.run`)."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
