"""The supervisor behind `backbone up`: restarts tiers that die, stops all on request."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import ops.stack.lifecycle
from ops.stack import KafkaCluster, StackError, stack_down
from ops.stack.lifecycle import KafkaPart, Part
from ops.stack.postgres import Postgres
from ops.stack.redis import Redis
from ops.stack.state import StateStore
from ops.supervisor import Supervisor, Tier
from ops.up import BACKGROUND_NICE, run_up, running_parts, tiers


def make_module(root: Path, name: str, body: str) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(body)


async def test_a_crashing_tier_is_restarted_and_all_stop_on_request(tmp_path: Path) -> None:
    starts = tmp_path / "starts.log"
    make_module(
        tmp_path,
        "crashy",
        f"open({str(starts)!r}, 'a').write('start\\n'); raise SystemExit(3)\n",
    )
    make_module(tmp_path, "steady", "import time\nwhile True:\n    time.sleep(1)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    supervisor = Supervisor(
        [Tier("crashy", "crashy"), Tier("steady", "steady", copies=2)], env, grace=5
    )
    running = asyncio.create_task(supervisor.run())
    async with asyncio.timeout(30):
        while not starts.exists() or starts.read_text().count("start") < 3:
            await asyncio.sleep(0.05)
    assert supervisor.restarts["crashy-0"] >= 2
    assert "steady-0" not in supervisor.restarts

    supervisor.stop()
    async with asyncio.timeout(15):
        await running
    procs = supervisor._procs
    assert {"steady-0", "steady-1", "crashy-0"} <= set(procs)
    assert all(p.returncode is not None for p in procs.values()), "every child has exited"


def test_only_tiers_with_a_main_module_are_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package without ``__main__`` (a tier not built yet) is not started by `up`."""
    make_module(tmp_path, "runnable", "")
    (tmp_path / "placeholder").mkdir()
    (tmp_path / "placeholder" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Tier("runnable", "runnable").available()
    assert not Tier("placeholder", "placeholder").available()
    assert not Tier("nothing", "no_such_module_here").available()


async def test_a_tier_runs_at_the_niceness_it_is_given(tmp_path: Path) -> None:
    """``backbone up`` gives background tiers a niceness; the tier applies it to itself."""
    seen = tmp_path / "niceness"
    make_module(
        tmp_path,
        "background",
        "import os\n"
        "from eventstore.runtime import run\n"
        "async def main() -> None:\n"
        f"    open({str(seen)!r}, 'w').write(str(os.getpriority(os.PRIO_PROCESS, 0)))\n"
        "    while True:\n"
        "        await __import__('asyncio').sleep(1)\n"
        "run(main())\n",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    supervisor = Supervisor([Tier("background", "background", nice=7)], env, grace=5)
    running = asyncio.create_task(supervisor.run())
    async with asyncio.timeout(30):
        while not seen.exists() or not seen.read_text():
            await asyncio.sleep(0.05)
    supervisor.stop()
    async with asyncio.timeout(15):
        await running
    assert int(seen.read_text()) == max(7, os.getpriority(os.PRIO_PROCESS, 0))


def test_up_runs_the_background_tiers_niced_and_the_serving_ones_not() -> None:
    args = argparse.Namespace(
        projector_workers=1, ingest_workers=1, fanout_workers=1, ingest_port=1, fanout_port=2
    )
    niceness = {tier.name: tier.nice for tier in tiers(args)}
    assert niceness["projectors"] == niceness["archiver"] == BACKGROUND_NICE > 0
    assert niceness["ingest"] == niceness["fanout"] == 0


async def test_a_tier_that_cannot_be_spawned_is_retried_and_the_others_stop_gracefully(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fork failing (EAGAIN) on a restart is one more failed start, not the end of supervision."""
    terminated = tmp_path / "terminated"
    make_module(
        tmp_path,
        "steady",
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(terminated)!r}, 'w').write('SIGTERM')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "while True:\n"
        "    time.sleep(1)\n",
    )
    make_module(tmp_path, "brief", "raise SystemExit(1)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    supervisor = Supervisor(
        [Tier("a", "steady"), Tier("b", "brief")], env, grace=10, max_backoff=0.1
    )
    spawn = supervisor._spawn
    spawns_of_b = 0

    async def flaky_spawn(tier: Tier, index: int) -> asyncio.subprocess.Process:
        nonlocal spawns_of_b
        if tier.name == "b":
            spawns_of_b += 1
            if spawns_of_b == 2:
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return await spawn(tier, index)

    monkeypatch.setattr(supervisor, "_spawn", flaky_spawn)
    running = asyncio.create_task(supervisor.run())
    try:
        async with asyncio.timeout(30):
            while spawns_of_b < 4 and not running.done():
                await asyncio.sleep(0.02)
        assert not running.done(), "the supervisor keeps running after a failed spawn"
        assert supervisor.restarts["b-0"] >= 3
        supervisor.stop()
        async with asyncio.timeout(15):
            await running
        assert terminated.read_text() == "SIGTERM", "tier a was stopped with SIGTERM"
        assert supervisor._procs["a-0"].returncode == 0
    finally:
        for proc in supervisor._procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class KafkaThatFails(KafkaPart):
    """Kafka whose start fails (as a port clash would): `up` fails part-way through."""

    def start(self) -> None:
        raise StackError("kafka", "cannot start in this test")


@pytest.fixture
def small_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir whose stack is real Redis and PostgreSQL, and a Kafka that fails to start."""
    data_dir = (tmp_path / "stack").resolve()

    def parts(data_dir: Path, store: StateStore, brokers: int) -> dict[str, Part]:
        return {
            "kafka": KafkaThatFails(KafkaCluster(data_dir, store=store)),
            "postgres": Postgres(data_dir, store),
            "redis": Redis(data_dir, store),
        }

    monkeypatch.setattr(ops.stack.lifecycle, "_parts", parts)
    monkeypatch.setattr(ops.stack.lifecycle, "_packages", lambda _parts: [])
    try:
        yield data_dir
    finally:
        stack_down(data_dir)
        # A cluster under pytest's private temp dir lives in /var/tmp (Postgres.fallback_home).
        fallback = Postgres(data_dir, StateStore(data_dir)).fallback_home.parent
        shutil.rmtree(fallback, ignore_errors=True)


def test_up_that_fails_part_way_stops_what_it_started_and_only_that(small_stack: Path) -> None:
    Redis(small_stack, StateStore(small_stack)).start()  # running before `up`
    assert running_parts(small_stack) == {"redis"}
    args = argparse.Namespace(
        dir=str(small_stack),
        brokers=1,
        projector_workers=1,
        ingest_workers=1,
        fanout_workers=1,
        ingest_port=1,
        fanout_port=2,
    )
    with pytest.raises(StackError, match="cannot start in this test"):
        run_up(args)
    assert running_parts(small_stack) == {"redis"}, "postgres (started by up) is stopped"
