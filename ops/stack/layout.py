"""Where the stack keeps things: its data directory, its logs, and its download cache.

A data directory holds everything one stack instance owns (state file, server data, configs,
logs), so several stacks (the developer's `.stack/`, a test's temporary cluster) never share
files. Downloaded jars are different: they are immutable per version, so they live in a per-user
cache shared by every data directory and survive `rm -rf .stack`.
"""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK = "127.0.0.1"
STATE_FILE = "stack.json"


def repo_root() -> Path | None:
    """The checkout this package runs from, if it runs from one (editable install)."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else None


def default_stack_dir() -> Path:
    """`$BACKBONE_STACK_DIR`, else `<repo root>/.stack` (else `./.stack` outside a checkout)."""
    configured = os.environ.get("BACKBONE_STACK_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    root = repo_root()
    return (root if root is not None else Path.cwd()) / ".stack"


def cache_dir() -> Path:
    """The stack's download cache: `$XDG_CACHE_HOME/backbone` (default `~/.cache/backbone`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "backbone"


def logs_dir(data_dir: Path) -> Path:
    """Directory holding one log file per server of the stack in `data_dir`."""
    return data_dir / "logs"


def log_file(data_dir: Path, part: str) -> Path:
    """The log file of `part` (its stdout and stderr, and its own logging)."""
    return logs_dir(data_dir) / f"{part}.log"
