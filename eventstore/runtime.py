"""Process set-up shared by every tier: JSON logs and the event loop.

Every tier's ``__main__`` calls :func:`configure_logging` once and runs its coroutine with
:func:`run`, which uses uvloop when it is installed (it is, on Linux) and falls back to the
standard loop elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import types
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from eventstore.consumer import GroupReader
from eventstore.ends import LogEnds
from eventstore.errors import ConfigError
from eventstore.settings import Settings

if TYPE_CHECKING:  # imported where served: a replay worker or CLI command never loads aiohttp
    from aiohttp import web

T = TypeVar("T")
log = structlog.get_logger(__name__)


_HANDLER_NAME: Final = "backbone"


def configure_logging(level: str | None = None) -> None:
    """JSON lines on stderr, one per event: structlog's own, with context variables (the request
    id) merged in, and the libraries' standard-library records (asyncpg, aiokafka, aiohttp)
    rendered the same way, with the name of their logger (a traceback is a field of the line,
    not lines of its own). The libraries log warnings and errors only, unless ``debug`` is
    asked for: their ``info`` records narrate routine steps (a consumer group's every
    rebalance). An exception that ends the process is logged as an ``uncaught`` event too.
    """
    name = (level or os.environ.get("BACKBONE_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[structlog.typing.Processor] = [
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Ours replaces ours (a second call); a handler someone else installed (a test runner's
    # capture) stays.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    sys.excepthook = _log_uncaught


def log_failure(tier: str, error: Exception) -> None:
    """A tier's last event when it cannot start or go on (a bad setting, a server it cannot
    reach): ``<tier>.failed`` with the error's message, which names what to fix."""
    log.error(f"{tier}.failed", error=str(error))


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: types.TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    log.critical("uncaught", exc_info=(kind, value, traceback))


SERVER_GC: Final = (50_000, 20, 50)
BULK_GC: Final = (5_000_000, 20, 100)


def tune_gc(*, bulk: bool = False) -> None:
    """Collect garbage for a long-running, allocation-heavy server (or a ``bulk`` job).

    Every tier allocates tens of thousands of short-lived objects per batch or burst (records,
    envelopes, frames). With CPython's defaults (a young collection every 700 allocations) the
    collector ran so often that decoding went at half speed in a replay worker, and in the
    fan-out node it showed up as self time of whatever allocated. Everything alive at start
    (modules, settings) is frozen out of collection, and the young generation is collected
    every 50,000 allocations: a pause of a millisecond or two, rarely.

    ``bulk`` (a replay worker: throughput, no one waiting on a pause) collects a hundred times
    less often still, every five million allocations. Each collection walks the young objects
    still alive, which in a replay are mostly the batches in flight (100,000 records and the
    one read ahead), so fewer collections walk the same batches fewer times: at 500,000 a
    million-event replay ran at 29k events/s, at five million at 36-40k (alternating runs, two
    workers); each pause is longer, as it walks up to ten times as many young objects (not
    measured). Cyclic garbage is rare on that path and still collected, later.
    """
    gc.freeze()
    gc.set_threshold(*(BULK_GC if bulk else SERVER_GC))


# glibc's mallopt parameters (malloc.h), and what a bulk worker sets them to.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
BULK_MMAP_THRESHOLD: Final = 32 * 1024 * 1024
"""glibc's largest (on 64-bit): blocks up to this size come from the heap, not from mmap."""
BULK_TRIM_THRESHOLD: Final = 1024 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep the memory a bulk worker frees for its next batch (glibc only; ``False`` where
    the C library has no ``mallopt``, which changes nothing).

    A replay worker allocates and frees a whole batch at a time: a fetch's buffers, the
    records, their decoded events and rows, some hundreds of megabytes. Under glibc's defaults
    its large blocks are mapped afresh and unmapped when freed, and the heap's free top is
    given back to the kernel, so the next batch faults every page in again (minor faults, at a
    kernel entry and a zeroed page each). With blocks up to 32 MiB taken from the heap and the
    heap kept up to a gibibyte, the next batch reuses the same pages: in alternating
    million-event replays, 490-520k minor faults against 600-730k, 45.6-46.5k events/s against
    43.1-44.3k. The price is that a worker keeps its peak (its batch's) memory until it ends.
    Python's own allocator (objects up to 512 bytes) maps its arenas itself; this leaves it be.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library is among the process's symbols
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; each setting also turns glibc's dynamic threshold off.
    return bool(mallopt(_M_MMAP_THRESHOLD, BULK_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, BULK_TRIM_THRESHOLD)
    )


_serving = False
"""Whether this process is a tier started by :func:`run` (not, say, a test run)."""


def started() -> None:
    """Call once a tier has finished starting: what it built (pools, clients, caches, the
    app) lives as long as the process, so it is frozen out of collection too. Otherwise every
    full collection walked all of it again: a pause of a hundred milliseconds or more in the
    middle of serving, which was the ingest tier's p99. Only in a tier's own process (one
    :func:`run` started): an app built inside a test run must not freeze its garbage."""
    if _serving:
        gc.freeze()


NICE_ENV: Final = "BACKBONE_NICE"


def scheduling_niceness(env: Mapping[str, str]) -> int:
    """The niceness ``BACKBONE_NICE`` asks for (0..19; 0 when unset); ConfigError otherwise."""
    raw = env.get(NICE_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise ConfigError(f"{NICE_ENV} must be an integer from 0 to 19, not {raw!r}")
    return value


def run(main: Coroutine[Any, Any, T], *, bulk: bool = False) -> T:
    """Run ``main`` on uvloop when available, with the collector tuned (:func:`tune_gc`;
    ``bulk`` for a worker that moves records in bulk and keeps no one waiting, such as the
    archiver or a replay worker, which keeps the memory it frees, too: :func:`tune_malloc`).

    A tier started with ``BACKBONE_NICE`` first lowers its own scheduling priority to that
    niceness (never raises it), before any thread exists, so every thread it makes has it too:
    ``backbone up`` runs the projectors and the archiver at 10, and on a machine whose cores the
    tiers share, the ones clients wait on (ingest, fan-out) get the CPU first while those
    background tiers lag by a few milliseconds more and catch up in the gaps.
    """
    global _serving
    niceness = scheduling_niceness(os.environ)
    if niceness > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    _serving = True
    tune_gc(bulk=bulk)
    if bulk:
        tune_malloc()
    return _loop_run(main)


def run_command(main: Coroutine[Any, Any, T], *, bulk: bool = True) -> T:
    """Run an operator command that works through the log in bulk (replay, archive verify,
    restore-log) as a bulk worker runs: on uvloop, collecting young garbage as seldom as
    :func:`tune_gc` does with ``bulk``. The collector's settings are restored afterwards and
    nothing is frozen, so a command run inside another program (a test) leaves it as it was.

    ``bulk=False`` collects as a serving tier does instead: what a benchmark of the tiers'
    own code paths (the producer's appends) runs under.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(*(BULK_GC if bulk else SERVER_GC))
    try:
        return _loop_run(main)
    finally:
        gc.set_threshold(*thresholds)


def _loop_run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency of the package
        return asyncio.run(main)
    return uvloop.run(main)


async def serve_member(
    reader: GroupReader,
    settings: Settings,
    *,
    name: str,
    http: web.Application | None,
    host: str,
    port: int,
    track_lag: Callable[[LogEnds], Coroutine[Any, Any, None]],
    **fields: object,
) -> None:
    """Run a consumer-group worker until SIGTERM/SIGINT: the shape every group member shares.

    SIGTERM and SIGINT stop the reader after the batch in flight; ``http`` (its metrics and
    health routes) is served on ``host:port`` when ``port`` is set; ``track_lag`` runs beside
    the reader with a log-end reader of its own. Logs ``<name>.started`` and ``<name>.stopped``.
    """
    from aiohttp import web

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, reader.stop)
    ends = LogEnds(settings)
    await ends.start()
    runner: web.AppRunner | None = None
    try:
        if port and http is not None:
            runner = web.AppRunner(http)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
        started()
        log.info(f"{name}.started", metrics_port=port, **fields)
        lag = asyncio.create_task(track_lag(ends))
        try:
            await reader.run()
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
        log.info(f"{name}.stopped")
    finally:
        if runner is not None:
            await runner.cleanup()
        await ends.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
