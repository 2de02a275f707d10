"""Each of the three documented uses runs end to end (briefly), as its own command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_existing_project_example(tmp_path):
    out = run("existing_project.py", "--fast", "--out", str(tmp_path), cwd=tmp_path)
    assert "5-way 1-shot:" in out and list(tmp_path.rglob("metrics.csv")) and list(tmp_path.rglob("*.ckpt"))


def test_distributed_example_on_two_cpu_processes(tmp_path):
    out = run("distributed.py", "--accelerator", "cpu", "--devices", "2", "--global-meta-batch", "4", "--fast",
              cwd=tmp_path)
    assert "world size 2, 2 tasks per rank per step" in out


def test_wandb_example_offline_writes_the_run_with_images(tmp_path):
    pytest.importorskip("wandb")
    out = run("wandb_logging.py", "--offline", "--fast", "--save-dir", str(tmp_path), cwd=tmp_path)
    assert "W&B run:" in out
    assert list(tmp_path.rglob("run-*.wandb")) and list(tmp_path.rglob("*adaptation_curve*.png"))
