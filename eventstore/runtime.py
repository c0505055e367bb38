"""Process set-up shared by every tier: JSON logs and the event loop.

Every tier's ``__main__`` calls :func:`configure_logging` once and runs its coroutine with
:func:`run`, which uses uvloop when it is installed (it is, on Linux) and falls back to the
standard loop elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

T = TypeVar("T")


def configure_logging(level: str | None = None) -> None:
    """structlog JSON lines on stderr, with context variables (the request id) merged in."""
    name = (level or os.environ.get("BACKBONE_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency of the package
        return asyncio.run(main)
    return uvloop.run(main)
