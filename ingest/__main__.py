"""``python -m ingest`` (``backbone serve ingest``): one ingest process.

Several processes may run at once on one port: the socket is opened with ``SO_REUSEPORT`` and
the kernel spreads connections across them. SIGTERM/SIGINT stop accepting, let in-flight
requests finish (bounded by ``BACKBONE_INGEST_SHUTDOWN_GRACE``), then close the clients.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
from aiohttp import web

from eventstore import EventStoreError, load_settings
from eventstore.runtime import configure_logging, log_failure, run
from ingest.app import create_app
from ingest.config import IngestConfig, load_ingest_config

log = structlog.get_logger("ingest")


async def serve(config: IngestConfig) -> None:
    app = create_app(load_settings(), config)
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_grace, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=True, backlog=1024)
    await site.start()
    log.info("ingest.listening", url=f"http://{config.host}:{config.port}/v1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("ingest.shutdown")
        await runner.cleanup()


def main() -> int:
    configure_logging()
    try:
        config = load_ingest_config()
        run(serve(config))
    except EventStoreError as exc:
        log_failure("ingest", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
