"""Choosing loopback ports that do not collide with other services on the machine.

Each part prefers a fixed port in a high range so addresses stay stable across runs; when that
port is held by something that is not ours, the kernel picks a free one instead. The choice is
then recorded in the state file, so later runs and other processes find it.
"""

from __future__ import annotations

import socket

from ops.stack.layout import LOOPBACK


def port_is_free(port: int) -> bool:
    """Whether a server could bind `LOOPBACK:port` right now.

    SO_REUSEADDR mirrors what the servers themselves do, so connections of a previous instance
    lingering in TIME_WAIT do not make our own port look taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def ephemeral_port() -> int:
    """A port that is free at this instant, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def choose_port(recorded: int | None, preferred: int | None, taken: set[int]) -> int:
    """The port a stopped part should listen on next.

    The recorded port wins while it is free (stable addresses), then the preferred one, then any
    free port. `taken` holds ports already handed to other parts in this run.
    """
    for candidate in (recorded, preferred):
        if candidate is not None and candidate not in taken and port_is_free(candidate):
            return candidate
    while True:
        port = ephemeral_port()
        if port not in taken:
            return port
