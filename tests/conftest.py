"""Session fixtures shared by the whole suite: the real local stack.

Tests never mock a server that can run here: the `stack` fixture starts the local stack (or
reuses a running one) once per session and points the `BACKBONE_*` environment at it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ops.stack import StackInfo, default_stack_dir, stack_down, stack_status, stack_up

pytest_plugins = ["tests.store_fixtures", "tests.system_fixtures"]


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    """The local stack in `default_stack_dir()`, started (or reused) for the session.

    Parts this session started are stopped at its end, unless BACKBONE_KEEP_STACK=1 (handy when
    re-running tests: the next session reuses them). Parts that already ran are left alone.
    """
    data_dir = default_stack_dir()
    was_running = {row.name for row in stack_status(data_dir) if row.running}
    info = stack_up(data_dir)
    started = tuple(
        name
        for name in ("kafka", "postgres", "redis", "s3")
        if not any(row.startswith(name) for row in was_running)
    )
    saved = {key: os.environ.get(key) for key in info.env()}
    os.environ.update(info.env())
    try:
        yield info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if started and os.environ.get("BACKBONE_KEEP_STACK") != "1":
            stack_down(data_dir, parts=started)
