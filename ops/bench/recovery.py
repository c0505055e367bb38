"""``backbone bench recovery``: events per second of archiving the log to S3, verifying the
archive, and rebuilding the read model from Kafka and from the archive; seconds per 1M events.

One run, the local stack, fresh topics, a fresh database (both dropped afterwards) and a fresh
archive prefix (``bench/<topic prefix>``, its objects deleted afterwards):

1. **write** ``--events`` events through the event store's producer: one user, up to 256
   groups, then 1 KB ``MessageSent`` events across them (sealed bodies, as in production);
2. **archive**: one archiver (in process, the same :class:`~ops.archiver.Archiver` the tier
   runs) from offset 0 until every partition's chain reaches the log end;
3. **verify**: ``archive verify`` over the result (every body fetched, hashed and decoded);
4. **rebuild from Kafka** and **from S3**: :func:`ops.replay.replay`, which ``backbone replay
   --from kafka|s3`` runs: a shadow schema built from offset 0 (its long build pass by
   ``--workers`` processes, from Kafka or from the archive segment by segment), swapped in,
   the Redis caches rebuilt. Each source gets a target schema of its own (``rebuilt_kafka``,
   ``rebuilt_s3``); the time is the wall time of the whole call.

The two rebuilt models must have equal checksums, the offsets of all events written and one
message row per ``MessageSent``; the command fails (exit 1) otherwise. The JSON holds
``rebuild_seconds_per_million`` per source, extrapolated from the measured rate, beside the
goal (30 s per 1M events).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec

from eventstore import EventStore, Settings, TopicLayout
from eventstore.archive import Archive, ArchiveConfig, verify_archive
from eventstore.ends import end_offsets
from eventstore.objects import s3_client
from eventstore.runtime import configure_logging, run_command
from ops.archiver.worker import archive_until
from ops.bench.project import fresh_deployment
from ops.bench.report import Figures, table, write_json
from ops.environment import stack_settings
from ops.replay import ProgressReporter, replay
from ops.stack import default_stack_dir, stack_up
from projectors.rebuild import RebuildResult, default_workers
from projectors.schema import in_schema
from projectors.sources import REPLAY_BATCH
from schemas import ConversationCreated, Event, MessageSent, UserRegistered

BODY = ("lorem ipsum dolor sit amet " * 40)[:730]
GOAL_SECONDS_PER_MILLION: Final = 30.0
SOURCES: Final = ("kafka", "s3")
TARGETS: Final = {"kafka": "rebuilt_kafka", "s3": "rebuilt_s3"}
"""Source -> the schema its rebuild is swapped into (in the bench's own database)."""
_MAX_ROOMS: Final = 256
_SETUP_CHUNK: Final = 100


class Rebuilt(msgspec.Struct, frozen=True):
    """One timed rebuild and what it produced."""

    source: str
    seconds: float
    """Wall time of the whole :func:`ops.replay.replay` call."""
    result: RebuildResult
    messages: int
    """Rows in the rebuilt model's ``messages`` table."""

    @property
    def events(self) -> int:
        """Events the swapped-in model has applied: the sum of its next offsets."""
        return sum(self.result.positions.values())


class Measured(msgspec.Struct, frozen=True):
    rows: list[Figures]
    rebuilt: dict[str, Rebuilt]
    messages: int
    """``MessageSent`` events written."""
    archive_prefix: str
    """Where in the archive bucket the run's segments were (deleted at its end)."""


def rooms_for(events: int) -> int:
    """Groups the workload creates: one per 20 events, at least 1, at most 256."""
    return max(1, min(_MAX_ROOMS, events // 20))


async def _write(store: EventStore, events: int, chunk: int = 1000) -> tuple[int, float]:
    """``events`` events in all: one ``UserRegistered``, the groups, then messages across them
    (every message's group exists before it, so the whole log projects); (messages, seconds)."""
    sender = uuid.uuid4()
    rooms = [uuid.uuid4() for _ in range(rooms_for(events))]
    messages = events - 1 - len(rooms)
    setup: list[Event] = [
        UserRegistered(user_id=sender, username=f"u{sender.hex[:12]}", email="b@bench.test")
    ]
    setup += [
        ConversationCreated(conversation_id=room, creator_id=sender, name=f"room {n}")
        for n, room in enumerate(rooms)
    ]
    began = time.perf_counter()
    for start in range(0, len(setup), _SETUP_CHUNK):
        await store.producer.append(setup[start : start + _SETUP_CHUNK])
    pending: set[asyncio.Task[Any]] = set()
    for start in range(0, messages, chunk):
        batch = [
            MessageSent(
                conversation_id=rooms[n % len(rooms)],
                message_id=uuid.uuid4(),
                sender_id=sender,
                client_msg_id=f"b-{n}",
                body=BODY,
            )
            for n in range(start, min(start + chunk, messages))
        ]
        pending.add(asyncio.create_task(store.producer.append(batch)))
        if len(pending) >= 8:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    await asyncio.gather(*pending)
    return messages, time.perf_counter() - began


async def _archive(settings: Settings, archive: Archive, config: ArchiveConfig) -> float:
    ends = await end_offsets(settings, TopicLayout.from_settings(settings).every_partition())
    began = time.perf_counter()
    await archive_until(settings, archive, config, ends, max_records=20_000)
    return time.perf_counter() - began


async def _rebuild(
    settings: Settings, source: str, archive: Archive, batch: int, workers: int | None
) -> Rebuilt:
    """Time ``backbone replay --from <source>`` (its library call) into the source's target."""
    reporter = ProgressReporter(as_json=False, out=sys.stdout, err=sys.stderr)
    began = time.perf_counter()
    try:
        result = await replay(
            settings,
            TARGETS[source],
            batch=batch,
            on_progress=reporter,
            workers=workers,
            source=source,
            # Where this run archived, whatever BACKBONE_ARCHIVE_* say.
            archive_prefix=archive.prefix if source == "s3" else None,
            archive_bucket=archive.bucket if source == "s3" else None,
        )
    finally:
        reporter.finish()
    seconds = time.perf_counter() - began
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        messages = await conn.fetchval(
            in_schema(result.schema, "SELECT count(*) FROM {schema}.messages")
        )
    finally:
        await conn.close()
    return Rebuilt(source, seconds, result, int(messages))


async def _delete_archive(archive: Archive) -> None:
    for key in await archive.list_keys(archive.prefix + "/"):
        await archive.delete(key)


def _say(text: str) -> None:
    print(f"bench recovery: {text}", file=sys.stderr, flush=True)


async def bench(
    events: int, segment_records: int, batch: int = REPLAY_BATCH, workers: int | None = None
) -> Measured:
    base = stack_settings(stack_up(default_stack_dir()))
    async with fresh_deployment(base, "recov") as settings:
        _say(f"writing {events:,} events")
        async with await EventStore.open(settings) as store:
            messages, wrote = await _write(store, events)
        config = ArchiveConfig(
            prefix=f"bench/{settings.topic_prefix}",
            segment_records=segment_records,
            flush_seconds=1.0,
        )
        client = s3_client(settings)
        archive = Archive(client, config.bucket, config.prefix)
        try:
            _say(f"written in {wrote:.1f} s; archiving")
            archived = await _archive(settings, archive, config)
            _say(f"archived in {archived:.1f} s; verifying")
            began = time.perf_counter()
            result = await verify_archive(archive)
            verified = time.perf_counter() - began
            rebuilt: dict[str, Rebuilt] = {}
            for source in SOURCES:
                _say(f"rebuilding from {source}")
                rebuilt[source] = await _rebuild(settings, source, archive, batch, workers)
        finally:
            try:
                await _delete_archive(archive)  # topics and caches go with the deployment
            finally:
                client.close()
    segments = sum(c.segments for c in result.chains)
    note = f"{segments} segments, verify ok={result.ok}"
    # Rebuild deals a build pass out to worker processes only when it is long enough, from
    # either source; the shorter passes run in the calling process.
    how = f"workers: {workers or default_workers()} for long passes"
    rows = [
        _row("write (EventProducer, 1 KB events)", events, wrote),
        _row("archive to S3 (one archiver)", events, archived, note),
        _row("archive verify", events, verified, note),
    ]
    rows += [
        _row(
            f"rebuild from {source} (backbone replay)",
            done.result.records,
            done.seconds,
            f"{how}, batch {batch}, checksum {done.result.checksum[:12]}",
        )
        for source, done in rebuilt.items()
    ]
    return Measured(rows, rebuilt, messages, config.prefix)


def _row(name: str, count: int, seconds: float, note: str = "") -> Figures:
    return Figures(
        name=name,
        count=count,
        seconds=round(seconds, 3),
        per_second=round(count / seconds, 1) if seconds > 0 else 0.0,
        note=note,
    )


def per_million(count: int, seconds: float) -> float:
    """Seconds for 1M events at the rate of ``count`` events in ``seconds``."""
    return round(seconds / count * 1_000_000, 1) if count else float("inf")


def problems(measured: Measured, events: int) -> list[str]:
    """What is wrong with the rebuilt models (empty: both are the model the log implies)."""
    found: list[str] = []
    for source, done in measured.rebuilt.items():
        if done.result.records != events or done.events != events:
            found.append(
                f"rebuild from {source} applied {done.result.records:,} events, its offsets "
                f"cover {done.events:,}; {events:,} were written"
            )
        if done.messages != measured.messages:
            found.append(
                f"rebuild from {source} holds {done.messages:,} messages, "
                f"{measured.messages:,} were written"
            )
    if len({done.result.checksum for done in measured.rebuilt.values()}) > 1:
        found.append("the rebuilds from Kafka and from S3 have different checksums")
    return found


def run(args: argparse.Namespace) -> int:
    configure_logging("warning")
    # As the commands it times run: the archiver, verify and replay all collect as bulk jobs.
    measured = run_command(bench(args.events, args.segment_records, args.batch, args.workers))
    rows = measured.rows
    goal = GOAL_SECONDS_PER_MILLION
    archive_spm = per_million(rows[1].count, rows[1].seconds)
    rebuild_spm = {
        source: per_million(done.result.records, done.seconds)
        for source, done in measured.rebuilt.items()
    }
    print(table(rows))
    print(f"\n{'wall time':<40} {'seconds':>8}  per 1M events (goal <= {goal:g} s)")
    for row, spm in zip(rows[1:2] + rows[3:], [archive_spm, *rebuild_spm.values()], strict=True):
        print(f"{row.name:<40} {row.seconds:>8.2f}  {spm:,.1f} s")
    checksums = {source: done.result.checksum for source, done in measured.rebuilt.items()}
    equal = len(set(checksums.values())) == 1
    print(f"rebuilt models: checksums {'equal' if equal else 'DIFFER'}")
    found = problems(measured, args.events)
    write_json(
        Path(args.json),
        "recovery",
        {
            "events": args.events,
            "segment_records": args.segment_records,
            "batch": args.batch,
            "workers": args.workers,
        },
        rows,
        {
            "messages": measured.messages,
            "archive_prefix": measured.archive_prefix,
            "archive_seconds_per_million": archive_spm,
            "rebuild_seconds_per_million": {**rebuild_spm, "goal": goal},
            "rebuild": {
                source: {
                    "events": done.events,
                    "applied": done.result.records,
                    "seconds": round(done.seconds, 3),
                    "messages": done.messages,
                    "checksum": done.result.checksum,
                }
                for source, done in measured.rebuilt.items()
            },
            "checksums_equal": equal,
            "problems": found,
        },
    )
    print(f"wrote {args.json}")
    for problem in found:
        print(f"backbone bench recovery: {problem}", file=sys.stderr)
    return 1 if found else 0


def _events(raw: str) -> int:
    value = int(raw)
    if value < 100:
        raise argparse.ArgumentTypeError(f"{raw}: at least 100 events")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "recovery",
        help="events/s of archiving to S3, verifying, and rebuilding from Kafka and from S3",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=_events, default=1_000_000)
    parser.add_argument("--segment-records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=REPLAY_BATCH, help="records per replay batch")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes of the rebuild's long passes (default: as backbone replay)",
    )
    parser.add_argument("--json", default="bench-results/recovery.json", metavar="PATH")
    parser.set_defaults(func=run)
