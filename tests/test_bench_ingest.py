"""``backbone bench ingest`` runs end to end (tiny counts) and writes its figures as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ops.bench.cores import CoreSplit
from ops.bench.ingest import WrkResult
from ops.cli import main
from ops.stack import StackInfo


def test_bench_ingest_writes_every_subject(stack: StackInfo, tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    code = main(
        [
            "bench",
            "ingest",
            "--seconds",
            "2",
            "--rounds",
            "2",
            "--raw-events",
            "300",
            "--conversations",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    names = [row["name"] for row in document["results"]]
    assert names[0].startswith("bare aiohttp")
    assert any(n.startswith("ingest x1: max rate") for n in names)
    assert any(n.startswith("ingest x2") for n in names)
    assert "ingest x1: half rate, projector following" in names
    single = next(r for r in document["results"] if r["name"] == "ingest x1: max rate")
    assert single["count"] > 0
    assert "non-2xx" in single["note"]
    assert document["ratio_vs_bare"] > 0
    assert document["params"]["split"] is True
    assert len(document["round_ratios"]) == 2
    assert all(r > 0 for r in document["round_ratios"])


def test_wrk_rounds_combine_counts_and_keep_the_worst_tail() -> None:
    runs = [
        WrkResult(100, 1_000_000, 1, 0, 2000, 9000, 12000),
        WrkResult(300, 2_000_000, 0, 2, 4000, 7000, 30000),
        WrkResult(200, 1_000_000, 0, 0, 3000, 8000, 10000),
    ]
    both = WrkResult.combined(runs)
    assert (both.requests, both.duration_us, both.bad_status, both.socket_errors) == (
        600,
        4_000_000,
        1,
        2,
    )
    assert both.rate == 150.0
    assert (both.p50_us, both.p99_us, both.max_us) == (3000, 9000, 30000)


def _affinity(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def test_core_split_puts_the_subject_alone_and_restores_every_mask() -> None:
    everything = os.sched_getaffinity(0)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    subject = subprocess.Popen(sleeper)
    # Another process below the bench (as wrk, a projector or a server's backend would be).
    other = subprocess.Popen(sleeper)
    # A process narrowed before the block gets its own mask back, not every core.
    narrowed = {min(everything)}
    os.sched_setaffinity(other.pid, narrowed)
    try:
        split = CoreSplit(subject.pid, [os.getpid()])
        with split():
            if len(everything) > 1:
                assert _affinity(subject.pid) == {max(everything)}
                assert _affinity(other.pid) == everything - {max(everything)}
                assert _affinity(os.getpid()) == everything - {max(everything)}
                # Started inside the block, a process inherits its parent's side.
                late = subprocess.Popen(sleeper)
                try:
                    assert _affinity(late.pid) == everything - {max(everything)}
                finally:
                    late.kill()
                    late.wait()
            else:
                assert not split.active
        for pid in (subject.pid, os.getpid()):
            assert _affinity(pid) == everything
        assert _affinity(other.pid) == narrowed
    finally:
        for proc in (subject, other):
            proc.kill()
            proc.wait()
