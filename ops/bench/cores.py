"""One core for the process under measurement, the other cores for everything else.

On a machine of two cores the serving process shares its core with whatever else is busy:
the load generator, Kafka, Redis, PostgreSQL, a projector following the log. Which of them
lands beside it changes from run to run, and so did every throughput figure measured there
(the same code measured 54 to 78 % of its ceiling). Ingest's issue states how its ceiling is
measured: "with wrk on the other core". :class:`CoreSplit` does that for any subject: for the
length of a block, the subject's threads may run only on the last core, and every thread of
the other processes the bench answers for (the stack's servers, the bench itself with the
load generator and tier processes it spawns) only on the remaining cores. New processes and
threads inherit the mask of their parent, so a PostgreSQL backend or a ``wrk`` started inside
the block lands on the right side too. On the way out every thread gets back the mask it had
(one started inside the block gets every core the bench may use).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ops.stack import stack_status

_PROC = Path("/proc")


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name (field 2) is parenthesised and may hold spaces or parentheses.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(roots: Iterable[int], tree: dict[int, list[int]] | None = None) -> set[int]:
    """``roots`` and every process below them (in ``tree``, default: as /proc shows it now)."""
    tree = _children() if tree is None else tree
    found: set[int] = set()
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(tree.get(pid, ()))
    return found


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in (_PROC / str(pid) / "task").iterdir()]
    except OSError:
        return []


def _pin(pids: Iterable[int], cores: set[int], saved: dict[int, set[int]]) -> None:
    """Every thread of ``pids`` on ``cores``; the mask each had first is kept in ``saved``."""
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(OSError):  # exited meanwhile, or not ours to move
                saved.setdefault(tid, os.sched_getaffinity(tid))
                os.sched_setaffinity(tid, cores)


def _restore(pids: Iterable[int], saved: dict[int, set[int]], default: set[int]) -> None:
    """Every thread of ``pids`` back on the mask it had (``default``: started meanwhile)."""
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, saved.get(tid, default))


def stack_pids(data_dir: Path) -> list[int]:
    """The running servers of the local stack in ``data_dir``."""
    return [part.pid for part in stack_status(data_dir) if part.running and part.pid]


class CoreSplit:
    """Pins ``subject`` (a pid) to the last allowed core and ``others`` (pids, with their
    descendants) to the rest, while the context is open; a no-op on a single core."""

    def __init__(self, subject: int, others: Iterable[int]) -> None:
        self.subject = subject
        self.others = list(others)
        allowed = sorted(os.sched_getaffinity(0))
        self.all = set(allowed)
        self.subject_cores = {allowed[-1]}
        self.other_cores = set(allowed[:-1])

    @property
    def active(self) -> bool:
        return bool(self.other_cores)

    def _everyone_else(self) -> set[int]:
        tree = _children()  # one walk of /proc for both
        return descendants(self.others, tree) - descendants([self.subject], tree)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.active:
            yield
            return
        saved: dict[int, set[int]] = {}
        _pin([self.subject], self.subject_cores, saved)
        _pin(self._everyone_else(), self.other_cores, saved)
        try:
            yield
        finally:
            _restore(self._everyone_else() | {self.subject}, saved, self.all)
