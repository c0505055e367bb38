"""``backbone bench recovery``: events per second of archiving the log to S3, and of verifying it.

Writes ``--events`` 1 KB ``MessageSent`` events (sealed bodies, as in production) to fresh
topics, then runs one archiver (in process, the same :class:`~ops.archiver.Archiver` the tier
runs) from offset 0 until every partition's chain reaches the log end, and times it; then
times ``archive verify`` over the result (every body fetched, hashed and decoded).
Replay from S3 and from Kafka belong to the replay part of the operations issue.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from eventstore import EventStore, LogEnds, Settings, TopicLayout, provision_topics
from eventstore.archive import Archive, ArchiveConfig, verify_archive
from eventstore.objects import s3_client
from eventstore.runtime import configure_logging
from ops.archiver.worker import archive_until
from ops.bench.report import Figures, write_json
from ops.environment import stack_settings
from ops.stack import default_stack_dir, stack_up
from schemas import MessageSent

BODY = ("lorem ipsum dolor sit amet " * 40)[:730]


async def _write(settings: Settings, events: int, chunk: int = 1000) -> float:
    rooms = [uuid.uuid4() for _ in range(256)]
    sender = uuid.uuid4()
    began = time.perf_counter()
    async with await EventStore.open(settings) as store:
        pending: set[asyncio.Task[Any]] = set()
        for start in range(0, events, chunk):
            batch = [
                MessageSent(
                    conversation_id=rooms[n % len(rooms)],
                    message_id=uuid.uuid4(),
                    sender_id=sender,
                    client_msg_id=f"b-{n}",
                    body=BODY,
                )
                for n in range(start, min(start + chunk, events))
            ]
            pending.add(asyncio.create_task(store.producer.append(batch)))
            if len(pending) >= 8:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        await asyncio.gather(*pending)
    return time.perf_counter() - began


async def _archive(settings: Settings, archive: Archive, config: ArchiveConfig) -> float:
    layout = TopicLayout.from_settings(settings)
    partitions = [(layout.topic("user"), p) for p in range(settings.user_partitions)] + [
        (layout.topic("conversation"), p) for p in range(settings.conversation_partitions)
    ]
    ends_reader = LogEnds(settings)
    await ends_reader.start()
    try:
        ends = await ends_reader.end_offsets(partitions)
    finally:
        await ends_reader.stop()
    began = time.perf_counter()
    await archive_until(settings, archive, config, ends, max_records=20_000)
    return time.perf_counter() - began


async def bench(events: int, segment_records: int) -> list[Figures]:
    info = stack_up(default_stack_dir())
    base = stack_settings(info)
    settings = msgspec.structs.replace(base, topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    await provision_topics(settings.kafka_bootstrap, TopicLayout.from_settings(settings))
    wrote = await _write(settings, events)
    config = ArchiveConfig(
        prefix=f"bench/{settings.topic_prefix}",
        segment_records=segment_records,
        flush_seconds=1.0,
    )
    client = s3_client(settings)
    try:
        archive = Archive(client, config.bucket, config.prefix)
        archived = await _archive(settings, archive, config)
        began = time.perf_counter()
        result = await verify_archive(archive)
        verified = time.perf_counter() - began
    finally:
        client.close()
    segments = sum(c.segments for c in result.chains)
    note = f"{segments} segments, verify ok={result.ok}"
    return [
        _row("write (EventProducer, 1 KB events)", events, wrote),
        _row("archive to S3 (one archiver)", events, archived, note),
        _row("archive verify", events, verified, note),
    ]


def _row(name: str, count: int, seconds: float, note: str = "") -> Figures:
    return Figures(
        name=name,
        count=count,
        seconds=round(seconds, 3),
        per_second=round(count / seconds, 1) if seconds > 0 else 0.0,
        note=note,
    )


def run(args: argparse.Namespace) -> int:
    configure_logging("warning")
    rows = asyncio.run(bench(args.events, args.segment_records))
    for row in rows:
        print(
            f"{row.name:<38} {row.count:>9,} events {row.seconds:>8.2f} s "
            f"{row.per_second:>10,.0f}/s  {row.note}"
        )
    write_json(
        Path(args.json),
        "recovery",
        {"events": args.events, "segment_records": args.segment_records},
        rows,
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "recovery",
        help="events/s of archiving the log to S3 and of verifying the archive",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--segment-records", type=int, default=20_000)
    parser.add_argument("--json", default="bench-results/recovery.json", metavar="PATH")
    parser.set_defaults(func=run)
