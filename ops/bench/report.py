"""Shared pieces of every benchmark: latency summaries, the printed table, the JSON file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec


class Figures(msgspec.Struct, frozen=True):
    """One measured subject: throughput and latency percentiles."""

    name: str
    count: int
    seconds: float
    per_second: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    note: str = ""


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def figures(name: str, latencies_s: list[float], seconds: float, note: str = "") -> Figures:
    ordered = sorted(latencies_s)
    return Figures(
        name=name,
        count=len(ordered),
        seconds=round(seconds, 3),
        per_second=round(len(ordered) / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(percentile(ordered, 0.50) * 1000, 2),
        p99_ms=round(percentile(ordered, 0.99) * 1000, 2),
        max_ms=round(ordered[-1] * 1000, 2) if ordered else None,
        note=note,
    )


def table(rows: Sequence[Figures]) -> str:
    header = f"{'subject':<40} {'count':>8} {'per s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    lines = [header, "-" * len(header)]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for row in rows:
        lines.append(
            f"{row.name:<40} {row.count:>8} {row.per_second:>10.0f} "
            f"{cell(row.p50_ms):>8} {cell(row.p99_ms):>8} {cell(row.max_ms):>8}"
        )
    return "\n".join(lines)


def reference_loop_ns(iterations: int = 2_000_000, rounds: int = 3) -> float:
    """Nanoseconds per iteration of a fixed pure-Python loop (best of ``rounds``): how fast this
    machine runs Python right now. Figures of different days or machines compare only beside
    it (these shared virtual machines have differed by more than two times)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for i in range(iterations):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best / iterations * 1e9, 1)


def write_json(
    path: Path,
    bench: str,
    params: dict[str, Any],
    rows: Sequence[Figures],
    extra: dict[str, Any] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    loop_ns = reference_loop_ns()
    print(f"machine: the reference Python loop ran at {loop_ns} ns an iteration")
    document = {
        "bench": bench,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # Which build: a distribution's optimised one or a version manager's (the same
            # version of CPython has run this project's replays 11-14 % apart).
            "interpreter": os.path.realpath(sys.executable),
            "reference_loop_ns": loop_ns,
        },
        "params": params,
        "results": [msgspec.to_builtins(r) for r in rows],
        **(extra or {}),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


class CpuMeter:
    """CPU seconds (user + system) a process spends from now on, per unit of work."""

    def __init__(self, pid: int) -> None:
        self._stat = Path(f"/proc/{pid}/stat")
        self._start = self._seconds()

    def _seconds(self) -> float:
        return _reading(self._stat.read_text()).own / os.sysconf("SC_CLK_TCK")

    def per(self, units: int) -> float:
        """Microseconds of CPU per unit (request, event) since this meter was made."""
        return round((self._seconds() - self._start) / max(1, units) * 1e6, 1)


class _Reading(NamedTuple):
    """One process's ``stat``: its parent, its own CPU and its reaped children's, in ticks."""

    parent: int
    own: int
    children: int


def _reading(stat: str) -> _Reading:
    # Fields 4 (ppid), 14 and 15 (utime, stime), 16 and 17 (cutime, cstime: the children it has
    # waited for); the command name before them may hold spaces.
    fields = stat.rpartition(")")[2].split()
    own, children = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
    return _Reading(int(fields[1]), own, children)


class GroupCpuMeter:
    """CPU seconds that a group of processes spends while it runs (a ``with`` block), processes
    that start or exit meanwhile included: PostgreSQL's backends come and go with connections,
    and an exited process's time would vanish from a reading at the end. ``member`` picks the
    processes by command name; a thread reads them every ``interval`` seconds. A member that
    exits is counted whole through its parent when the parent is a member that waited for it
    (a backend through the postmaster), however briefly it lived (a replay worker's connections
    can come and go between two readings); otherwise by its last reading, which may miss its
    last ``interval``.

    The thread's own CPU (:attr:`own_seconds`) is the measuring process's, not the group's: a
    bench subtracts it from that process's figure. Each reading opens every process's ``stat``;
    at ten readings a second through :mod:`pathlib` that had cost 6 % of a core, counted as the
    replaying processes' CPU on the bench's two."""

    def __init__(self, member: Callable[[str], bool], interval: float = 0.5) -> None:
        self._member = member
        self._interval = interval
        self._start: dict[int, _Reading] = {}
        self._last: dict[int, _Reading] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self.seconds = 0.0
        self.own_seconds = 0.0

    def _read(self) -> dict[int, _Reading]:
        found: dict[int, _Reading] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fd = os.open(f"/proc/{entry.name}/stat", os.O_RDONLY)
            except OSError:  # exited meanwhile
                continue
            try:
                stat = os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:
                continue
            finally:
                os.close(fd)
            if self._member(stat[stat.find("(") + 1 : stat.rfind(")")]):
                found[int(entry.name)] = _reading(stat)
        return found

    def _follow(self) -> None:
        started = time.thread_time()
        while not self._done.wait(self._interval):
            self._last.update(self._read())
        self.own_seconds = time.thread_time() - started

    def __enter__(self) -> GroupCpuMeter:
        self._start = self._read()
        self._last = dict(self._start)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        end = self._read()
        self._last.update(end)
        ticks = 0
        for pid, last in self._last.items():
            start = self._start.get(pid, _Reading(last.parent, 0, 0))
            if pid in end:  # its own time, and that of the children it waited for meanwhile
                ticks += last.own - start.own + last.children - start.children
            elif last.parent in end:  # whole in its parent's children's time: not twice
                ticks -= start.own
            else:
                ticks += last.own - start.own
        self.seconds = ticks / os.sysconf("SC_CLK_TCK")

    def per(self, units: int) -> float:
        """Microseconds of CPU per unit (event) over the block."""
        return round(self.seconds / max(1, units) * 1e6, 1)
