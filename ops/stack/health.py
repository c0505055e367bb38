"""Waiting until freshly started (or reused) servers actually serve.

No fixed sleeps: each check is polled with a short, growing delay, and the wait ends early with
the server's exit code when its process dies, which is how a bad config or a port clash shows
up within a second instead of after the whole timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ops.stack.errors import StackError
from ops.stack.process import poll


@dataclass(frozen=True)
class Target:
    """A started server process and the check that tells it serves."""

    part: str
    pid: int
    check: Callable[[], bool]
    log: Path


def wait_healthy(targets: Sequence[Target], *, timeout: float) -> float:
    """Poll every target's check until all pass; return the seconds waited.

    Raises StackError naming the part and its log as soon as a process exits, or when the
    deadline passes with some target still not healthy.
    """
    start = time.monotonic()
    deadline = start + timeout
    pending = list(targets)
    delay = 0.05
    while True:
        still: list[Target] = []
        for target in pending:
            liveness = poll(target.pid)
            if not liveness.alive:
                code = "" if liveness.exit_code is None else f" with code {liveness.exit_code}"
                raise StackError(
                    target.part,
                    f"the server (pid {target.pid}) exited{code} while starting",
                    target.log,
                )
            if not target.check():
                still.append(target)
        pending = still
        if not pending:
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            first = pending[0]
            raise StackError(
                first.part,
                f"the server (pid {first.pid}) did not become healthy within {timeout:.0f}s",
                first.log,
            )
        time.sleep(delay)
        delay = min(delay * 1.4, 0.5)
