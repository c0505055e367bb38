"""``python -m projectors``: run one projector worker with the ``BACKBONE_*`` environment."""

from __future__ import annotations

import asyncio
import logging
import sys

import structlog

from eventstore import EventStoreError, load_settings
from projectors.worker import run


def _configure_logging() -> None:
    """JSON log lines on stderr, one per event (stdlib records from libraries included)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main() -> int:
    _configure_logging()
    try:
        settings = load_settings()
    except EventStoreError as exc:
        print(f"projectors: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not built for every platform)
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(run(settings))
    except EventStoreError as exc:
        print(f"projectors: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
