"""``backbone bench project`` runs end to end with a tiny count and writes valid JSON.

Only the command is tested here, never its figures: timings belong to the benchmark run.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench.project import workload
from ops.bench.report import GroupCpuMeter
from ops.cli import main
from ops.stack import StackInfo
from schemas import ConversationCreated, MessageSent, UserRegistered

INTERPRETER = os.path.realpath(sys.executable)
"""The interpreter file this run's ``python`` resolves to (what a bench names its build by)."""


def test_workload_is_mostly_messages_after_users_and_groups() -> None:
    events = workload(20_000, seed=1).events
    kinds = [type(e) for e in events]
    assert len(events) == 20_000
    assert kinds[0] is UserRegistered
    assert kinds.count(MessageSent) > 0.8 * len(events)
    assert kinds.count(ConversationCreated) == 200
    assert len({type(e) for e in events}) >= 8, "edits, deletes, reactions, markers, joins too"


async def test_bench_project_writes_its_figures(stack: StackInfo, tmp_path: Path) -> None:
    out = tmp_path / "project.json"
    argv = ["bench", "project", "--events", "1500", "--live-events", "40", "--live-rate", "100"]
    argv += ["--rounds", "2"]
    status = await asyncio.to_thread(main, [*argv, "--json", str(out)])
    assert status == 0
    document = json.loads(out.read_text())
    assert document["bench"] == "project"
    assert document["params"]["events"] == 1500
    names = [r["name"] for r in document["results"]]
    each_round = ["replay: Projector over LogReader", "raw COPY of the same rows"]
    assert names == [
        "write: encode_event + send_records",
        *each_round,
        *each_round,
        "live: append -> applied (worker)",
    ]
    replays = [document["results"][1], document["results"][3]]
    assert [r["count"] for r in replays] == [1500, 1500]
    assert all(r["per_second"] > 0 for r in replays)
    assert document["results"][5]["count"] == 40
    # Each figure is the median of the rounds, and each round is kept beside it.
    rounds = document["rounds"]
    assert [r["replay_per_second"] for r in rounds] == [r["per_second"] for r in replays]
    assert document["replay_per_second"] == statistics.median(r["per_second"] for r in replays)
    ratios = [r["replay_vs_copy"] for r in rounds]
    assert document["replay_vs_copy"] == round(statistics.median(ratios), 4)
    assert all(
        r["replay_vs_copy"] == round(r["replay_per_second"] / r["copy_per_second"], 4)
        for r in rounds
    )
    assert document["live_p99_ms"] >= document["live_p50_ms"] > 0
    assert document["live_worker_cpu_us_per_event"] > 0
    assert 1 <= document["live_events_per_batch"] <= 40
    assert document["replay_vs_copy"] > 0
    assert document["replay_python_cpu_us_per_event"] > 0
    assert document["replay_postgres_cpu_us_per_event"] > 0
    # Every bench records how fast this machine ran Python, to compare figures across days.
    assert document["machine"]["reference_loop_ns"] > 0
    assert document["machine"]["interpreter"] == INTERPRETER


def test_a_group_cpu_meter_counts_processes_that_exit_within_it(tmp_path: Path) -> None:
    """PostgreSQL's backends come and go with connections: a process that starts and exits
    inside the block still counts (all but its last sampling interval at most)."""
    burner = tmp_path / "burnmeter"  # the process's command name: nothing else is called that
    burner.symlink_to(sys.executable)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with GroupCpuMeter(lambda name: name == "burnmeter", interval=0.02) as meter:
        subprocess.run([str(burner), "-c", "sum(range(30_000_000))"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert spent > 0.2
    assert spent - 0.1 <= meter.seconds <= spent + 0.02
    assert meter.per(1000) == round(meter.seconds / 1000 * 1e6, 1)
    # The meter's own reading is this process's CPU, kept apart for a bench to subtract.
    assert 0 < meter.own_seconds < spent


_FORKS_AND_WAITS = """
import os, sys
for _ in range(4):
    child = os.fork()
    if child == 0:
        sum(range(6_000_000))
        os._exit(0)
    os.waitpid(child, 0)
print("done", flush=True)
sys.stdin.read()  # alive until the test lets it go, as a postmaster outlives its backends
"""


def test_a_group_cpu_meter_counts_members_that_live_between_two_readings(tmp_path: Path) -> None:
    """A PostgreSQL backend may start, work and exit between two readings (a replay worker's
    connection, in a short round): its time is counted through the member that waited for
    it, as the postmaster does for its backends."""
    burner = tmp_path / "burnmeter"
    burner.symlink_to(sys.executable)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with GroupCpuMeter(lambda name: name == "burnmeter", interval=30) as meter:
        parent = subprocess.Popen(
            [str(burner), "-c", _FORKS_AND_WAITS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert parent.stdout is not None
        assert parent.stdout.readline() == "done\n"
    parent.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert spent > 0.2  # the forked members' work, most of it
    assert spent - 0.05 <= meter.seconds <= spent + 0.02


def test_bench_project_refuses_zero_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "project", "--rounds", "0"])
    assert stopped.value.code == 2
    assert "0: at least 1 round" in capsys.readouterr().err
