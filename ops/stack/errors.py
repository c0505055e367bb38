"""The one error type of the local stack.

Every failure to fetch, configure or start a part is reported as a `StackError` that names the
part, says why, and points at the log file that has the details (with its last lines inlined, so
a failing test or CI run shows the cause without anyone having to open the file).
"""

from __future__ import annotations

from pathlib import Path

TAIL_LINES = 40


def log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of `log`, or a note that it does not exist (yet)."""
    try:
        with log.open("rb") as fh:
            # Read at most the last 64 KiB: server logs can be large, the tail is what matters.
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log file was written)"
    return "\n".join(data.splitlines()[-lines:])


class StackError(Exception):
    """A part of the local stack could not be installed, configured or started."""

    def __init__(self, part: str, reason: str, log: Path | None = None) -> None:
        self.part = part
        self.reason = reason
        self.log = log
        message = f"{part}: {reason}"
        if log is not None:
            message += f" (log: {log})\n--- last lines of {log} ---\n{log_tail(log)}"
        super().__init__(message)
