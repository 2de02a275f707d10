"""Several runs in one launch: a script that tests launch as a subprocess imports torch and Lightning once (5-10 s on
2 cores), then runs each job in a forked child process, a process of its own (its own exit status, signals, memory and
global state) that starts with those imports done. The parent runs no torch op before forking (no thread pool).
``run_ranks`` forks the ranks of one DDP job the same way, as a launcher such as torchrun starts them."""

import os
import signal
import socket
import subprocess
import sys
import time
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


def start_forked(job, *args, logs: Path, env: dict | None = None) -> int:
    """Fork a child that runs ``job(*args)`` (with ``env`` added to its environment) and exits, its stdout and stderr
    in ``logs``.out/.err; the child's pid. Its exit status: 0, the status of an uncaught ``SystemExit`` or 1 after an
    uncaught exception (with its traceback on stderr, as the interpreter does)."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        status = 1
        try:
            os.dup2(os.open(f"{logs}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(f"{logs}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.environ.update(env or {})
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
    return pid


def finished(pid: int, raw: int, logs: Path, args=()) -> subprocess.CompletedProcess:
    """A forked child's ``waitpid`` status and logs as ``subprocess.run`` reports them (``-signal`` when a signal
    killed it)."""
    code = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
    return subprocess.CompletedProcess(args, code, Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text())


def run_forked(job, *args, logs: Path) -> subprocess.CompletedProcess:
    """``job(*args)`` in a forked child (``start_forked``), waited for: its status and output."""
    pid = start_forked(job, *args, logs=logs)
    return finished(pid, os.waitpid(pid, 0)[1], logs, args)


def run_ranks(job, *args, world_size: int, logs: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``job(*args)`` on ``world_size`` forked processes, the ranks of one DDP job on this machine: each has ``RANK``,
    ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and a free ``MASTER_PORT`` in its environment, as a
    launcher such as torchrun sets them, so Lightning (its ``LightningEnvironment``) sees processes created externally
    and starts none. Rank r logs to ``logs``.rank{r}.out/.err. When a rank fails (or ``timeout`` s pass) the others are
    killed: they would wait in a collective for it. Each rank's status and output, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size), "NODE_RANK": "0"}
    paths = [Path(f"{logs}.rank{r}") for r in range(world_size)]
    pids = [start_forked(job, *args, logs=paths[r], env={**common, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(world_size)]
    raws: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(raws) < world_size:
        for r, pid in enumerate(pids):
            if r not in raws and (done := os.waitpid(pid, os.WNOHANG))[0]:
                raws[r] = done[1]
        failed = any(os.WIFSIGNALED(raw) or os.WEXITSTATUS(raw) for raw in raws.values())
        if failed or time.monotonic() > deadline:
            for r, pid in enumerate(pids):
                if r not in raws:
                    os.kill(pid, signal.SIGKILL)
                    raws[r] = os.waitpid(pid, 0)[1]
        time.sleep(0.02)
    return [finished(pids[r], raws[r], paths[r], args) for r in range(world_size)]
