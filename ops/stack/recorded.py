"""Stopping and reporting a part that runs as one recorded server process.

PostgreSQL, Redis and S3Proxy each run as a single process whose pid is recorded in the
state file. A recorded pid is only trusted while `/proc/PID/cmdline` still names the part's
*marker* (its config file or data directory): pids are reused, and `down` must never signal
a process the stack did not start.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from ops.stack.info import PartStatus
from ops.stack.layout import LOOPBACK
from ops.stack.process import is_ours, stop
from ops.stack.state import ProcessRecord, StateStore

MarkerOf = Callable[[ProcessRecord | None], Path]
"""The path that proves a recorded pid is this part's server (given the part's record)."""


def stop_recorded(
    store: StateStore, part: str, marker_of: MarkerOf, sig: int = signal.SIGTERM
) -> None:
    """Signal the part's recorded server if it is still ours, and forget its pid."""
    with store.edit() as state:
        record = state.parts.get(part)
        if record is None or record.pid is None:
            return
        pid = record.pid if is_ours(record.pid, marker_of(record)) else None
        record.pid = None
    if pid is not None:
        stop([pid], sig=sig)


def recorded_status(
    store: StateStore, part: str, marker_of: MarkerOf, log: Path
) -> list[PartStatus]:
    """The part's one status row: address, whether its recorded server runs, its log."""
    record = store.load().parts.get(part)
    alive = record is not None and is_ours(record.pid, marker_of(record))
    return [
        PartStatus(
            name=part,
            address=f"{LOOPBACK}:{record.port}" if record else "-",
            running=alive,
            pid=record.pid if record and alive else None,
            log=log,
        )
    ]
