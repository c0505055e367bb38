"""``python -m fanout`` (``backbone serve fanout``): one fanout process.

Several may run on one port (``SO_REUSEPORT``). SIGTERM/SIGINT stop accepting, close every
socket with 1001 (clients reconnect to another process and resume), wait a bounded grace for
the close frames to drain, then close the clients. The open-file soft limit is raised to the
hard one: every held socket is a file descriptor.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys

import structlog

from eventstore import EventStoreError, load_settings
from eventstore.runtime import configure_logging, log_failure, run
from fanout.config import FanoutConfig, load_fanout_config
from fanout.node import FanoutNode

log = structlog.get_logger("fanout")


def raise_open_files() -> int:
    """Raise the soft open-file limit to the hard one; the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def serve(config: FanoutConfig) -> None:
    node = FanoutNode(load_settings(), config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(node.wait())
    try:
        await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        failed.cancel()
        log.info("fanout.shutdown")
        await node.stop()
    if failed.done() and not failed.cancelled():
        raise SystemExit(1)


def main() -> int:
    configure_logging()
    try:
        config = load_fanout_config()
        log.info("fanout.open_files", limit=raise_open_files())
        run(serve(config))
    except EventStoreError as exc:
        log_failure("fanout", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
