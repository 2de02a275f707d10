"""Several runs in one launch: a script that tests launch as a subprocess imports torch and Lightning once (5-10 s on
2 cores), then runs each job in a forked child process, a process of its own (its own exit status, signals, memory and
global state) that starts with those imports done. The parent runs no torch op before forking (no thread pool)."""

import os
import subprocess
import sys
import traceback
from pathlib import Path


def exit_status(code) -> int:
    """The exit status CPython gives ``raise SystemExit(code)`` at the top level (an object is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_forked(job, *args, logs: Path) -> subprocess.CompletedProcess:
    """``job(*args)`` in a forked child whose stdout and stderr go to ``logs``.out/.err; its status as
    ``subprocess.run`` reports it: 0, the status of an uncaught ``SystemExit`` or 1 after an uncaught exception (with
    its traceback on stderr, as the interpreter does), ``-signal`` when a signal killed it."""
    sys.stdout.flush(), sys.stderr.flush()
    out, err = Path(f"{logs}.out"), Path(f"{logs}.err")
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        status = 1
        try:
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            try:
                job(*args)
                status = 0
            except SystemExit as exit_:
                status = exit_status(exit_.code)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(status)
    _, raw = os.waitpid(pid, 0)
    code = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
    return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())
