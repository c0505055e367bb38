"""Starting servers detached, recognising them later, and stopping them.

Servers must outlive the `backbone stack up` that started them, so they run in a session of
their own with stdout and stderr appended to their log file. They are started with
`posix_spawn` rather than `subprocess.Popen`: a Popen object for a process meant to keep running
warns (ResourceWarning) when it is garbage collected, and the test suite treats warnings as
errors. We reap our own children with `waitpid(WNOHANG)` whenever we look at them, so a server
that dies while its starter still runs does not linger as a zombie that looks alive.

A recorded pid is only trusted when `/proc/PID/cmdline` still names the server's own config or
data path in our data directory: pids get reused, and `down` must never signal a process that
is not ours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ops.stack.errors import StackError

STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Liveness:
    """Whether a pid runs; `exit_code` is known only for our own children that just ended."""

    alive: bool
    exit_code: int | None = None


def executable(part: str, name: str) -> str:
    """Absolute path of the program `name`, or a StackError for `part` naming what is missing."""
    found = shutil.which(name)
    if found is None:
        raise StackError(part, f"`{name}` is not on PATH")
    return found


def privilege_drop(user: str | None) -> list[str]:
    """argv prefix that runs a command as `user` when we are root (empty otherwise).

    `setpriv` execs in place instead of forking like `runuser`/`su`, so the pid we record is the
    server's own and signals reach it directly.
    """
    if user is None or os.geteuid() != 0:
        return []
    return [
        executable(user, "setpriv"),
        f"--reuid={user}",
        f"--regid={user}",
        "--init-groups",
        "--",
    ]


def rotate_log(log: Path) -> None:
    """Start a fresh `log` for a new server run, keeping the previous run's as `<log>.prev`.

    The new file then holds only this run (which is what a StackError quotes) while the last
    crash stays readable.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists() and log.stat().st_size > 0:
        log.replace(log.with_name(log.name + ".prev"))


def run_logged(
    argv: Sequence[str],
    log: Path,
    *,
    part: str,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a short command to completion, its output appended to `log`.

    A time-out or a non-zero exit is a :class:`StackError` naming `part`, `what` failed, and
    the log, so the user sees the command's own output in the error.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"=== {' '.join(argv)}\n")
        out.flush()
        try:
            result = subprocess.run(
                list(argv),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(part, f"{what} timed out after {timeout:g}s", log) from exc
    if result.returncode != 0:
        raise StackError(part, f"{what} failed with code {result.returncode}", log)


def spawn_detached(argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> int:
    """Start `argv` in a new session with output appended to `log`; return its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n")
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(
        argv[0],
        list(argv),
        dict(os.environ if env is None else env),
        file_actions=file_actions,
        setsid=True,
    )


def _reap(pid: int) -> tuple[bool, int | None]:
    """(whether `pid` is our child, its exit code if it has exited and is now reaped)."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False, None  # not our child (started by an earlier `stack up`): ask /proc
    return True, (os.waitstatus_to_exitcode(status) if reaped == pid else None)


def poll(pid: int) -> Liveness:
    """Reap `pid` if it is our child that exited, then report whether it still runs."""
    child, code = _reap(pid)
    if code is not None:
        return Liveness(alive=False, exit_code=code)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return Liveness(alive=False)
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        # A zombie of someone else's is dead. Ours is dead too, but a multi-threaded one (a JVM)
        # cannot be reaped until its last thread has exited: report it as still running so the
        # caller polls again and reaps it, instead of leaving a zombie behind.
        return Liveness(alive=child)
    return Liveness(alive=True)


def cmdline(pid: int) -> str:
    """The command line of `pid` with arguments joined by spaces ('' if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", errors="replace")


def is_ours(pid: int | None, marker: Path) -> bool:
    """Whether `pid` runs and was started by this stack (its command line names `marker`)."""
    if pid is None or pid <= 0:
        return False
    return poll(pid).alive and str(marker) in cmdline(pid)


def stop(pids: Sequence[int], *, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
    """Signal `pids` with `sig`, wait up to `timeout`, then SIGKILL whatever still runs."""
    for pid in pids:
        _signal(pid, sig)
    remaining = wait_gone(pids, timeout)
    for pid in remaining:
        _signal(pid, signal.SIGKILL)
    wait_gone(remaining, 10.0)


def kill(pid: int) -> None:
    """SIGKILL `pid` and wait until it is gone (reaped, if it is our child)."""
    _signal(pid, signal.SIGKILL)
    wait_gone([pid], 10.0)


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Poll until every pid has exited; return the ones still running at the deadline."""
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    delay = 0.02
    while remaining:
        remaining = [pid for pid in remaining if poll(pid).alive]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return remaining


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile: nothing to do
        os.kill(pid, sig)
