"""Run by test_examples.py as its own command: `benchmarks/omniglot_accuracy.py --recipe R --limit-steps 1
--test-episodes 8 --checkpoint OUT_DIR/NAME.ckpt` for each recipe R, in order, each in a process of its own forked after
the imports (torch, Lightning and the script's own, paid once), as the command line runs it.

    python tests/recipe_run.py OUT_DIR RECIPE...      (RECIPE: a recipe file; NAME: its stem with its folder, / as __)

Writes OUT_DIR/NAME.json ({"returncode", "stdout", "stderr"}) as each run ends, then OUT_DIR/.finished.
"""

import json
import sys
from pathlib import Path

from forking import run_forked

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import omniglot_accuracy  # noqa: E402


def accuracy_command(args: list[str]) -> None:
    sys.argv = [str(ROOT / "benchmarks" / "omniglot_accuracy.py"), *args]
    omniglot_accuracy.main()


def result_name(recipe: str) -> str:
    return recipe.replace("/", "__")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    try:
        for recipe in sys.argv[2:]:
            name = result_name(str(Path(recipe).resolve().relative_to(ROOT / "examples" / "configs" / "recipes").with_suffix("")))
            proc = run_forked(accuracy_command, ["--recipe", recipe, "--limit-steps", "1", "--test-episodes", "8",
                                                 "--checkpoint", str(out / f"{name}.ckpt")], logs=out / name)
            (out / f"{name}.json").write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout,
                                                          "stderr": proc.stderr}))
    finally:
        (out / ".finished").touch()
