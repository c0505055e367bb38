"""Process set-up every tier shares: the event loop and the garbage collector's tuning."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import types
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from eventstore import runtime
from eventstore.errors import ConfigError
from eventstore.runtime import (
    BULK_GC,
    NICE_ENV,
    SERVER_GC,
    run,
    run_command,
    scheduling_niceness,
    started,
    tune_gc,
)


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    runtime._serving = False  # apps built by later tests must not freeze the test run


@pytest.mark.usefixtures("restored_gc")
def test_started_freezes_only_in_a_tier_process() -> None:
    runtime._serving = False
    tune_gc()  # as an in-process bench does: tuning alone does not make this a tier
    gc.unfreeze()
    started()
    assert gc.get_freeze_count() == 0, "an app built in a test run freezes nothing"
    runtime._serving = True  # what run() sets in a tier's process
    started()
    assert gc.get_freeze_count() > 0, "a tier's own process freezes what it built"


@pytest.mark.usefixtures("restored_gc")
def test_run_tunes_the_collector_and_runs_the_coroutine_on_uvloop() -> None:
    gc.unfreeze()
    # A "before" unlike the tuned one, high enough that no collection runs meanwhile (a
    # collection here would finalise whatever earlier tests left unreachable).
    gc.set_threshold(1_000_000, 1000, 1000)

    async def main() -> tuple[str, tuple[int, int, int], int]:
        import asyncio

        loop = asyncio.get_running_loop()
        return type(loop).__module__, gc.get_threshold(), gc.get_freeze_count()

    module, threshold, frozen = run(main())
    assert module.startswith("uvloop")
    assert threshold == SERVER_GC == (50_000, 20, 50)
    assert frozen > 0, "what was alive at start is frozen out of collection"


@pytest.mark.usefixtures("restored_gc")
def test_a_bulk_job_collects_its_young_objects_less_often_than_a_server() -> None:
    tune_gc(bulk=True)
    assert gc.get_threshold() == BULK_GC
    assert BULK_GC[0] >= 10 * SERVER_GC[0]
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restored_gc")
def test_a_bulk_command_runs_on_uvloop_as_a_bulk_job_and_leaves_the_collector_as_it_was() -> None:
    """``replay``, ``archive verify`` and ``restore-log`` run in the process that calls them (a
    test, the CLI): tuned while they run, untouched afterwards, nothing frozen."""
    gc.unfreeze()
    before = (1_000_000, 1000, 1000)  # high enough that no collection runs meanwhile
    gc.set_threshold(*before)

    async def main() -> tuple[str, tuple[int, int, int], int]:
        import asyncio

        loop = asyncio.get_running_loop()
        return type(loop).__module__, gc.get_threshold(), gc.get_freeze_count()

    module, threshold, frozen = run_command(main())
    assert module.startswith("uvloop")
    assert threshold == BULK_GC
    assert frozen == 0, "a command run inside another program freezes nothing of it"
    assert gc.get_threshold() == before
    assert not runtime._serving, "nor does it make that program a tier"


@pytest.mark.usefixtures("restored_gc")
def test_a_command_run_as_a_tier_collects_as_a_server_and_leaves_the_collector_as_it_was() -> None:
    """``bench produce`` runs the producer as the ingest tier runs it."""
    gc.unfreeze()
    before = (1_000_000, 1000, 1000)
    gc.set_threshold(*before)

    async def main() -> tuple[int, int, int]:
        return gc.get_threshold()

    assert run_command(main(), bulk=False) == SERVER_GC
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("restored_gc")
@pytest.mark.parametrize("bulk", [True, False])
def test_a_tier_started_as_a_bulk_worker_collects_and_keeps_memory_as_one(
    bulk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.unfreeze()
    gc.set_threshold(1_000_000, 1000, 1000)
    tuned: list[str] = []  # not tuned for real: that would last the whole test run
    monkeypatch.setattr(runtime, "tune_malloc", lambda: tuned.append("malloc") or True)

    async def main() -> tuple[int, int, int]:
        return gc.get_threshold()

    assert run(main(), bulk=bulk) == (BULK_GC if bulk else SERVER_GC)
    assert tuned == (["malloc"] if bulk else [])


# A batch as a bulk worker makes one: large blocks, every page written (bytearray zero-fills),
# all freed together. Two batches first, as a worker's first batches; then one counted.
_FAULTS_PROBE = """
import resource, sys
from eventstore.runtime import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def batch():
    return [bytearray(1 << 20) for _ in range(16)]
for _ in range(2):
    made = batch()
    del made
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
made = batch()
del made
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_bulk_worker_reuses_the_memory_it_freed_without_faulting_it_in_again() -> None:
    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    # Untuned, glibc hands the freed 16 MiB back to the kernel and faults it in again: one
    # fault per 4 KiB page. Tuned, the pages are reused as they are.
    assert faults("untuned") >= 16 * 256 * 0.9
    assert faults("tuned") < 16 * 256 * 0.05


@pytest.mark.parametrize(("raw", "niceness"), [("", 0), ("0", 0), (" 10 ", 10), ("19", 19)])
def test_the_niceness_a_tier_is_asked_for(raw: str, niceness: int) -> None:
    assert scheduling_niceness({NICE_ENV: raw}) == niceness
    assert scheduling_niceness({}) == 0


@pytest.mark.parametrize("raw", ["-1", "20", "ten", "1.5"])
def test_a_bad_niceness_stops_the_tier_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=NICE_ENV):
        scheduling_niceness({NICE_ENV: raw})


def test_a_replay_worker_starts_without_the_http_stack_or_a_redis_client() -> None:
    # Each replay worker process imports its entry module once per rebuild: aiohttp and the
    # Redis client took two fifths of that import's CPU, for a server and caches the worker
    # never has.
    probe = (
        "import sys; import projectors.rebuild; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'redis'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_replay_worker_runs_as_a_bulk_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from projectors import rebuild

    share = object()
    ran: list[tuple[object, bool]] = []
    sent: list[tuple[str, float]] = []

    async def replay_share(got: object, report: Callable[[int], None]) -> None:
        assert got is share
        report(7)

    def run_loop(main: Coroutine[Any, Any, None], *, bulk: bool = False) -> None:
        asyncio.run(main)
        ran.append((share, bulk))

    monkeypatch.setattr(rebuild, "_SHARE", types.SimpleNamespace(decode=lambda raw: share))
    monkeypatch.setattr(rebuild, "_replay_share", replay_share)
    monkeypatch.setattr(rebuild, "run_loop", run_loop)
    progress = types.SimpleNamespace(send=sent.append)
    rebuild.replay_worker_main(b"share", progress)  # type: ignore[arg-type]
    assert ran == [(share, True)]
    assert sent[0] == ("batch", 7), "each batch's record count goes back to the rebuild"
    assert sent[1][0] == "cpu", "and, once done, the CPU the worker spent"
    assert len(sent) == 2


_LOGGING_PROGRAM = """
import logging, structlog
from eventstore.runtime import configure_logging
configure_logging()
configure_logging()  # a second call replaces its own handler: still one line a record
structlog.get_logger("tier").info("tier.started", port=1)
logging.getLogger("asyncpg.pool").info("routine narration")
try:
    raise OSError("connection refused")
except OSError:
    logging.getLogger("asyncpg.pool").warning("Failed to connect; retrying", exc_info=True)
raise RuntimeError("the end")
"""


def test_every_log_line_is_a_json_event_library_records_and_an_uncaught_exception_too() -> None:
    """A tier's stderr is one JSON object a line: its own events; a library's warning with its
    logger's name and its traceback as a field (the library's routine ``info`` left out); and
    the exception that ends the process, as an ``uncaught`` event (exit code 1 as before)."""
    done = subprocess.run(
        [sys.executable, "-c", _LOGGING_PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("tier.started", "info"),
        ("Failed to connect; retrying", "warning"),
        ("uncaught", "critical"),
    ]
    started, warned, uncaught = lines
    assert started["port"] == 1
    assert "timestamp" in started
    assert warned["logger"] == "asyncpg.pool"
    assert warned["exception"].endswith("OSError: connection refused")
    assert uncaught["exception"].endswith("RuntimeError: the end")


@pytest.mark.parametrize(
    ("module", "tier"),
    [
        ("ingest", "ingest"),
        ("fanout", "fanout"),
        ("projectors", "projectors"),
        ("ops.archiver", "archiver"),
    ],
)
def test_a_tier_that_cannot_start_says_why_in_one_json_event(module: str, tier: str) -> None:
    """A bad setting stops every tier at start with one event, ``<tier>.failed``, whose error
    names the variable, its last, and a non-zero exit code for its supervisor."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    env["BACKBONE_USER_PARTITIONS"] = "many"
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # JSON, every one
    assert [(line["event"], line["level"]) for line in lines if line["level"] != "info"] == [
        (f"{tier}.failed", "error")
    ]
    assert lines[-1]["event"] == f"{tier}.failed"
    assert "BACKBONE_" in lines[-1]["error"]
