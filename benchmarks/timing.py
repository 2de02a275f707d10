"""The benchmarks' one timing helper, so a new benchmark is a short file: build the contenders, :func:`compare` them,
print :meth:`Results.table`.

- :func:`compare`: the contenders take turns, round after round, after untimed warm-up rounds, so machine noise
  (a busy neighbour, frequency changes) falls on all of them alike; each is summarised by its median round.
- :func:`per_call`: seconds per call of back-to-back calls (work too quick to time singly).
- :func:`median_time`: the median of a step's timed calls after warm-up calls (with a device synchronisation around
  each call where one is given), for a contender that measures itself step by step.
- :class:`Stopwatch`: the wall and CPU seconds of a one-off piece of work (a cache build, a whole evaluation).

Figures are measured in the same process and invocation, so a ratio compares like with like. Run benchmarks on an
otherwise idle machine: a test suite beside one changes its figures several-fold.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch


def float_images(episode: Any) -> Any:
    """An episode whose ``uint8`` images (what the datasets serve) are floats in [0, 1]: the inputs a bare loop or
    learn2learn expects, given to every contender alike so that they all do the same work (our learners take
    either)."""
    if episode.support_x.dtype != torch.uint8:
        return episode
    return episode._replace(support_x=episode.support_x.float() / 255, query_x=episode.query_x.float() / 255)


def cpu_seconds() -> float:
    """User and system CPU seconds of this process (its threads included; not its child processes)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Stopwatch:
    """``with Stopwatch() as clock: ...`` (or ``clock.start()`` ... ``clock.stop()``), then ``clock.wall`` and
    ``clock.cpu`` in seconds. Started again, it adds to its totals: the time of several separate pieces of work, with
    what lies between them (an untimed evaluation) left out."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._started: Optional[tuple[float, float]] = None

    def start(self) -> None:
        self._started = (time.perf_counter(), cpu_seconds())

    def stop(self) -> None:
        if self._started is not None:
            wall, cpu = self._started
            self.wall += time.perf_counter() - wall
            self.cpu += cpu_seconds() - cpu
            self._started = None

    def __enter__(self) -> Stopwatch:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def median_time(step: Callable[[int], Any], calls: int, warmup: int = 0,
                synchronize: Callable[[], None] = lambda: None) -> float:
    """The median wall seconds of ``step(i)`` for ``i`` in ``warmup..calls-1``, after the untimed calls
    ``0..warmup-1``; ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call."""
    times = []
    for i in range(calls):
        synchronize()
        start = time.perf_counter()
        step(i)
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not times:
        raise ValueError(f"median_time needs calls > warmup, but got calls={calls}, warmup={warmup}.")
    return statistics.median(times)


def per_call(fn: Callable[[], Any], calls: int) -> float:
    """Wall seconds per call over ``calls`` back-to-back calls of ``fn`` (work too quick to time one call at a time)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


class Results(dict):
    """``{contender: [seconds per round, ...]}`` from :func:`compare`, with medians, ratios and a printed table."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def medians(self) -> dict[str, float]:
        return {name: self.median(name) for name in self}

    def ratio(self, slower: str, faster: str) -> float:
        """How many times faster ``faster`` is than ``slower`` (median time of ``slower`` / of ``faster``)."""
        return self.median(slower) / self.median(faster)

    def table(self, baseline: Optional[str] = None, unit: str = "step", work: Optional[float] = None,
              work_unit: str = "episodes", rounds: bool = True) -> str:
        """One line per contender: the median milliseconds per ``unit``; ``work`` items per ``unit`` add a rate
        (e.g. episodes/s); with a ``baseline``, the speed-up over it (``2.0x`` = twice as fast); ``rounds`` lists
        every round's figure, so a noisy round shows."""
        width = max(len(name) for name in self)
        lines = []
        for name, t in self.medians().items():
            line = f"  {name:{width}s} {t * 1e3:9.2f} ms/{unit}"
            if work is not None:
                line += f"  {work / t:9.1f} {work_unit}/s"
            if baseline is not None:
                line += f"  {self.median(baseline) / t:6.2f}x {baseline}"
            if rounds and len(self[name]) > 1:
                line += f"   (rounds: {', '.join(f'{x * 1e3:.2f}' for x in self[name])})"
            lines.append(line)
        return "\n".join(lines)


def compare(contenders: Mapping[str, Callable[[], Optional[float]]], rounds: int = 3, warmup: int = 1) -> Results:
    """Call every contender once per round, in turn, for ``warmup`` untimed rounds (first calls, allocator, caches)
    and then ``rounds`` timed ones. A contender returns ``None`` to be timed around its call, or the seconds it
    measured itself (per step, say, from its first step after a warm-up, or a :func:`median_time`).

    Example:
        >>> results = compare({"sleep 2 ms": lambda: time.sleep(0.002), "says 1 ms": lambda: 0.001}, rounds=2)
        >>> results["says 1 ms"], results.ratio("sleep 2 ms", "says 1 ms") > 1.5
        ([0.001, 0.001], True)
    """
    results = Results({name: [] for name in contenders})
    for round_ in range(warmup + rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            measured = run()
            elapsed = time.perf_counter() - start if measured is None else measured
            if round_ >= warmup:
                results[name].append(elapsed)
    return results
