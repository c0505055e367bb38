"""``backbone bench recovery`` runs end to end (small counts) and writes its figures as JSON.

Only the figures' consistency is tested, never their size: timings belong to the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from eventstore.objects import ARCHIVE_BUCKET, s3_client
from ops.bench.recovery import Measured, Rebuilt, problems, rooms_for
from ops.cli import main
from ops.environment import stack_settings
from ops.stack import StackInfo
from projectors.rebuild import RebuildResult

EVENTS = 3000


def test_bench_recovery_archives_verifies_and_rebuilds(stack: StackInfo, tmp_path: Path) -> None:
    """Archive, verify, then rebuild from Kafka (two worker processes: the batch is small enough
    for the build pass to go parallel) and from S3: both models hold every event written, one
    row per message, and are byte-identical; the run's archive objects are gone afterwards."""
    out = tmp_path / "recovery.json"
    argv = ["bench", "recovery", "--events", str(EVENTS), "--segment-records", "250"]
    assert main([*argv, "--batch", "200", "--workers", "2", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["bench"] == "recovery"
    rows = {row["name"].split(" (")[0]: row for row in document["results"]}
    assert list(rows) == [
        "write",
        "archive to S3",
        "archive verify",
        "rebuild from kafka",
        "rebuild from s3",
    ]
    for row in rows.values():
        assert row["count"] == EVENTS
        assert row["seconds"] > 0
        # The rate is of the unrounded time; the JSON's seconds are rounded to the millisecond.
        low, high = EVENTS / (row["seconds"] + 5e-4), EVENTS / max(row["seconds"] - 5e-4, 1e-9)
        assert low - 0.1 <= row["per_second"] <= high + 0.1, row
    assert "verify ok=True" in rows["archive verify"]["note"]

    messages = EVENTS - 1 - rooms_for(EVENTS)  # one user, the groups, then messages
    assert document["messages"] == messages
    rebuilt = document["rebuild"]
    assert set(rebuilt) == {"kafka", "s3"}
    for source, figures in rebuilt.items():
        assert figures["applied"] == EVENTS, source
        assert figures["events"] == EVENTS, f"{source}: offsets of the swapped-in model"
        assert figures["messages"] == messages, source
        assert figures["seconds"] == rows[f"rebuild from {source}"]["seconds"]
    assert rebuilt["kafka"]["checksum"] == rebuilt["s3"]["checksum"]
    assert len(rebuilt["kafka"]["checksum"]) == 64
    assert document["checksums_equal"] is True
    assert document["problems"] == []

    per_million = document["rebuild_seconds_per_million"]
    assert per_million["goal"] == 30.0
    for source in ("kafka", "s3"):
        expected = rebuilt[source]["seconds"] / EVENTS * 1_000_000
        assert per_million[source] > 0
        assert abs(per_million[source] - expected) <= 5e-4 / EVENTS * 1e6 + 0.05, source
    archived = rows["archive to S3"]["seconds"]
    assert abs(document["archive_seconds_per_million"] - archived / EVENTS * 1e6) <= 0.05

    client = s3_client(stack_settings(stack))
    try:
        prefix = document["archive_prefix"]
        assert prefix.startswith("bench/")
        listed = client.list_objects_v2(Bucket=ARCHIVE_BUCKET, Prefix=f"{prefix}/")
        assert listed.get("KeyCount", 0) == 0, "the run's archive objects are deleted"
    finally:
        client.close()


def _rebuilt(source: str, *, records: int, messages: int, digest: str) -> Rebuilt:
    result = RebuildResult(
        schema=f"rebuilt_{source}",
        replaced=None,
        resumed=False,
        records=records,
        seconds=1.0,
        positions={"p.conversations/0": records},
        checksum=digest,
    )
    return Rebuilt(source, 1.0, result, messages)


def test_problems_names_a_rebuild_that_is_not_the_log() -> None:
    """The bench fails (exit 1) on a wrong model: missing events, missing message rows, or
    rebuilds from the two sources that differ."""

    def measured(*rebuilt: Rebuilt) -> Measured:
        return Measured([], {r.source: r for r in rebuilt}, messages=90, archive_prefix="bench/x")

    good = _rebuilt("kafka", records=100, messages=90, digest="a")
    assert problems(measured(good, _rebuilt("s3", records=100, messages=90, digest="a")), 100) == []
    short = problems(measured(good, _rebuilt("s3", records=99, messages=90, digest="a")), 100)
    assert short == ["rebuild from s3 applied 99 events, its offsets cover 99; 100 were written"]
    rows = problems(measured(good, _rebuilt("s3", records=100, messages=89, digest="a")), 100)
    assert rows == ["rebuild from s3 holds 89 messages, 90 were written"]
    differ = problems(measured(good, _rebuilt("s3", records=100, messages=90, digest="b")), 100)
    assert differ == ["the rebuilds from Kafka and from S3 have different checksums"]
