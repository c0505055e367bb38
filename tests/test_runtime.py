"""Process set-up every tier shares: the event loop and the garbage collector's tuning."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

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
def test_a_tier_started_as_a_bulk_worker_collects_as_one() -> None:
    gc.unfreeze()
    gc.set_threshold(1_000_000, 1000, 1000)

    async def main() -> tuple[int, int, int]:
        return gc.get_threshold()

    assert run(main(), bulk=True) == BULK_GC


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
