"""Each of the three documented uses runs end to end (briefly), as its own command."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import exclusive, once_per_run, wandb_worker

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_existing_project_example(tmp_path):
    out = run("existing_project.py", "--fast", "--out", str(tmp_path), cwd=tmp_path)
    assert "5-way 1-shot:" in out and list(tmp_path.rglob("metrics.csv")) and list(tmp_path.rglob("*.ckpt"))


def write_image_folders(root):
    """train/ and val/ folders of class folders of PNG images, as `--image-folder` reads them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", 12), ("val", 6)):
        for c in range(classes):
            (root / split / f"{split}{c}").mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / split / f"{split}{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    return once_per_run("image_folders", tmp_path_factory, write_image_folders)


@pytest.fixture(scope="module")
def two_processes(image_folders, tmp_path_factory):
    """The example's documented 2-process command, on images from one decoded-image cache, saving each rank's weights
    (launched once per test run, whichever pytest-xdist worker asks first)."""

    def launch(folder):
        (folder / "cache").mkdir()
        env = {"LIGHTNING_META_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}  # one thread each, as torchrun
        out = run("distributed.py", "--accelerator", "cpu", "--devices", "2", "--fast", "--image-folder",
                  str(image_folders), "--image-size", "16", "--save-weights", str(folder / "w"), cwd=folder, env=env)
        (folder / "out.txt").write_text(out)

    folder = once_per_run("two_processes", tmp_path_factory, launch)
    weights = [torch.load(folder / f"w.rank{r}.pt") for r in range(2)]
    return (folder / "out.txt").read_text(), weights, folder / "cache"


def test_distributed_example_on_two_cpu_processes_with_its_documented_flags(two_processes):
    # its own documented command (global meta-batch 32): before, it stopped at setup (8 validation episodes in
    # meta-batches of 16 for 2 processes)
    out, weights, cache = two_processes
    assert "world size 2, 16 tasks per rank per step" in out
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len(list(cache.glob("*.lmcache"))) == 2  # train and val: one decoded copy each, for both processes


def test_the_readme_torchrun_command_on_two_nodes_equals_one_node_with_two_processes(image_folders, two_processes,
                                                                                       tmp_path):
    """Two `torchrun --nnodes 2` invocations on 127.0.0.1 (1 process each) reading one cache end with equal weights on
    both nodes, equal to the single-node 2-process run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTNING_META_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), str(ROOT / "examples" / "distributed.py"),
         "--accelerator", "cpu", "--devices", "1", "--num-nodes", "2", "--fast", "--image-folder", str(image_folders),
         "--image-size", "16", "--save-weights", str(tmp_path / "w")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    node_weights = [torch.load(tmp_path / f"w.rank{r}.pt") for r in range(2)]
    assert all(torch.equal(node_weights[0][k], node_weights[1][k]) for k in node_weights[0])
    reference = two_processes[1][0]
    for w in node_weights:
        assert w.keys() == reference.keys()
        for k in w:
            torch.testing.assert_close(w[k], reference[k], rtol=0, atol=1e-6)
    assert len(list(cache.glob("*.lmcache"))) == 2  # both nodes mapped the same files (one machine here)


@wandb_worker
def test_wandb_example_offline_writes_the_run_with_images(tmp_path):
    pytest.importorskip("wandb")
    out = run("wandb_logging.py", "--offline", "--fast", "--save-dir", str(tmp_path), cwd=tmp_path)
    assert "W&B run:" in out
    assert list(tmp_path.rglob("run-*.wandb")) and list(tmp_path.rglob("*adaptation_curve*.png"))


RECIPES = ROOT / "examples" / "configs" / "recipes"
# the Omniglot recipes (`stages:`, run by benchmarks/omniglot_accuracy.py); the Meta-Dataset ones are `lightning-meta`
# configs, run end to end on fabricated records by test_metadataset_recipe.py
RECIPE_NAMES = sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml")
                      if not p.stem.startswith("metadataset_"))


def recipe_run(recipe: str, tmp_path_factory) -> tuple[dict, Path]:
    """``benchmarks/omniglot_accuracy.py --recipe`` on ``recipe`` (1 step a stage, 8 test episodes, a checkpoint): its
    exit status, stdout, stderr and checkpoint. One launch runs every recipe (tests/recipe_run.py forks each run after
    the imports), started by the first test that asks, in this worker; a test on another worker waits for its own."""
    with exclusive("recipe_runs", tmp_path_factory) as shared:
        folder, start = shared / "recipe_runs", not (shared / "recipe_runs").is_dir()
        if start:
            folder.mkdir()
    name = recipe.replace("/", "__")
    if start:
        launch = subprocess.run([sys.executable, str(ROOT / "tests" / "recipe_run.py"), str(folder),
                                 *(str(RECIPES / f"{r}.yaml") for r in RECIPE_NAMES)], cwd=folder, timeout=1200,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        (folder / ".finished").touch()  # (also when the launch itself broke)
        assert launch.returncode == 0, launch.stderr[-3000:]
    deadline = time.monotonic() + 1200
    while not (folder / f"{name}.json").is_file():
        assert not (folder / ".finished").is_file(), f"the recipe runs ended without {recipe}"
        assert time.monotonic() < deadline, f"no result for {recipe} after 20 minutes"
        time.sleep(0.5)
    return json.loads((folder / f"{name}.json").read_text()), folder / f"{name}.ckpt"


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_each_recipe_runs_prints_the_5_way_figure_last_and_saves_a_loadable_learner(recipe, tmp_path_factory):
    assert {"omniglot_protonet", "omniglot_attention", "omniglot_maml"} <= {p.stem for p in RECIPES.glob("*.yaml")}
    from conftest import OMNIGLOT, UNSEEN_ALPHABETS
    from lightning_meta import learners
    from lightning_meta.data import Omniglot

    if not (OMNIGLOT / "images_background_small2.zip").is_file():
        pytest.skip(f"real Omniglot zips not found in {OMNIGLOT}")
    proc, ckpt = recipe_run(recipe, tmp_path_factory)
    assert proc["returncode"] == 0, proc["stderr"][-3000:]
    lines = proc["stdout"].strip().splitlines()
    assert re.fullmatch(r"  5-way 1-shot on 8 episodes of unseen alphabets.*: \d+\.\d\d% \+- \d+\.\d\d%", lines[-1])
    trained = re.search(r"^(\w+): trained in [\d.]+ min wall, [\d.]+ CPU-min", proc["stdout"], re.M).group(1)
    learner = getattr(learners, trained).load_from_checkpoint(ckpt, weights_only=True)
    unseen = Omniglot(OMNIGLOT, ["images_background_small2"], alphabets=UNSEEN_ALPHABETS[:1])
    first = [int(torch.nonzero(unseen.labels == c)[0]) for c in range(5)]  # 5 characters, one image each
    support = torch.stack([unseen[i][0] for i in first])
    assert learner.adapt(support, torch.arange(5))(support).shape == (5, 5)
