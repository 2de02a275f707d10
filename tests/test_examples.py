"""Each of the three documented uses runs end to end (briefly), as its own command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_distributed_example_on_two_cpu_processes_with_its_documented_flags(tmp_path):
    # its own documented command (global meta-batch 32): before, it stopped at setup (8 validation episodes in
    # meta-batches of 16 for 2 processes)
    out = run("distributed.py", "--accelerator", "cpu", "--devices", "2", "--fast", cwd=tmp_path)
    assert "world size 2, 16 tasks per rank per step" in out


def test_wandb_example_offline_writes_the_run_with_images(tmp_path):
    pytest.importorskip("wandb")
    out = run("wandb_logging.py", "--offline", "--fast", "--save-dir", str(tmp_path), cwd=tmp_path)
    assert "W&B run:" in out
    assert list(tmp_path.rglob("run-*.wandb")) and list(tmp_path.rglob("*adaptation_curve*.png"))


RECIPES = ROOT / "examples" / "configs" / "recipes"


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml")))
def test_each_recipe_runs_prints_the_5_way_figure_last_and_saves_a_loadable_learner(recipe, tmp_path):
    assert {"omniglot_protonet", "omniglot_attention", "omniglot_maml"} <= {p.stem for p in RECIPES.glob("*.yaml")}
    from conftest import OMNIGLOT, UNSEEN_ALPHABETS
    from lightning_meta import learners
    from lightning_meta.data import Omniglot

    if not (OMNIGLOT / "images_background_small2.zip").is_file():
        pytest.skip(f"real Omniglot zips not found in {OMNIGLOT}")
    ckpt = tmp_path / "learner.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "omniglot_accuracy.py"), "--recipe",
         str(RECIPES / f"{recipe}.yaml"), "--limit-steps", "2", "--test-episodes",
         "8", "--checkpoint", str(ckpt)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"  5-way 1-shot on 8 episodes of unseen alphabets.*: \d+\.\d\d% \+- \d+\.\d\d%", lines[-1])
    trained = re.search(r"^(\w+): trained in [\d.]+ min wall, [\d.]+ CPU-min", proc.stdout, re.M).group(1)
    learner = getattr(learners, trained).load_from_checkpoint(ckpt, weights_only=True)
    unseen = Omniglot(OMNIGLOT, ["images_background_small2"], alphabets=UNSEEN_ALPHABETS[:1])
    first = [int(torch.nonzero(unseen.labels == c)[0]) for c in range(5)]  # 5 characters, one image each
    support = torch.stack([unseen[i][0] for i in first])
    assert learner.adapt(support, torch.arange(5))(support).shape == (5, 5)
