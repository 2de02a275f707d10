"""Run by test_cli.py as its own command: several `lightning-meta` command lines, each run as the console script runs
(`sys.exit(main())`, its exit status as the interpreter gives it) in a process of its own, forked after the imports.

    python tests/cli_run.py OUT_JSON NAME=ARGS_JSON...

Writes {NAME: {"returncode", "stdout", "stderr"}} to OUT_JSON.
"""

import json
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from forking import run_forked

import lightning_meta.cli


def console_script(args: list[str]) -> None:
    found = next(iter(entry_points(group="console_scripts", name="lightning-meta")), None)
    main = found.load() if found else lightning_meta.cli.main  # (a checkout that is not installed)
    sys.argv = ["lightning-meta", *args]
    sys.exit(main())


if __name__ == "__main__":
    logs, done = Path(tempfile.mkdtemp(prefix="cli-run-")), {}
    for named in sys.argv[2:]:
        name, args = named.split("=", 1)
        proc = run_forked(console_script, json.loads(args), logs=logs / name)
        done[name] = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    Path(sys.argv[1]).write_text(json.dumps(done))
