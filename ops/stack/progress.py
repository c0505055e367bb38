"""Short progress lines on stderr, so a developer watching `stack up` knows what it waits for."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Print `stack: <message>` to stderr (never stdout: `stack env` output must stay clean)."""
    print(f"stack: {message}", file=sys.stderr, flush=True)
