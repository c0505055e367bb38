"""The supervisor behind `backbone up`: restarts tiers that die, stops all on request."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from ops.supervisor import Supervisor, Tier
from ops.up import BACKGROUND_NICE, tiers


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
