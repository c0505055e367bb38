"""``backbone replay --from kafka|s3 --until T --into SCHEMA`` against the real stack.

A point-in-time replay is compared with a clean pass of only the events up to that point (read
from Kafka, filtered by their envelope time, applied by a Projector of its own); a replay from
the S3 archive with one from Kafka and with a clean replay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from eventstore import Batch, OffsetRange, RecordedEvent
from eventstore.archive import Archive, ArchiveConfig
from eventstore.objects import ARCHIVE_BUCKET, s3_client
from ops.replay import register
from ops.replay import replay as cli_replay
from ops.stack import StackInfo
from projectors import rebuild as rebuild_module
from projectors.checksum import checksum
from projectors.projector import Projector
from projectors.rebuild import Rebuild
from projectors.schema import create_schema, schema_exists
from projectors.sources import Cut, ReplaySourceError, SourceRecord, Until
from tests.test_archive import archive_log
from tests.test_projector_drills import produce, workload
from tests.test_projector_support import (
    World,
    message,
    world_fixture,  # noqa: F401 - provides the `world` fixture
)
from tests.test_rebuild import clean_checksum, rooms_and_senders

OTHER_BUCKET = "backbone-archive-elsewhere"


@pytest.fixture
async def client(stack: StackInfo, world: World) -> AsyncIterator[Any]:
    made = s3_client(world.settings)
    yield made
    made.close()


async def checksum_up_to(world: World, until: dt.datetime, name: str = "reference") -> str:
    """The checksum of a clean pass of only the events whose time is at or before ``until``."""
    store = world.store
    async with store.pool.acquire() as conn:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await create_schema(conn, name)
    projector = Projector(store.pool, store.layout, schema=name)
    reader = store.reader(max_records=1000)
    await reader.start("beginning")
    try:
        async for batch in reader.batches_until_end():
            kept: list[RecordedEvent] = []
            for item in batch.items:
                assert isinstance(item, RecordedEvent), item
                if item.envelope.time <= until:
                    kept.append(item)
            ranges: dict[tuple[str, int], OffsetRange] = {}
            for item in kept:
                p = (store.layout.topic(item.position.stream), item.position.partition)
                first = ranges[p].first if p in ranges else item.position.offset
                ranges[p] = OffsetRange(first, item.position.offset)
            await projector.handle(Batch(list(kept), ranges))
    finally:
        await reader.stop()
    async with store.pool.acquire() as conn:
        return await checksum(conn, name)


async def bodies(world: World, schema: str, prefix: str) -> list[str]:
    rows = await world.store.pool.fetch(
        f"SELECT body FROM {schema}.messages WHERE body LIKE $1 ORDER BY seq",
        prefix + "%",
    )
    return [r[0] for r in rows]


async def test_point_in_time_replay_equals_the_state_at_that_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replayed ``until`` T into a schema of its own: equal to a clean pass of the events up to
    T; the messages written after T are absent there (and present in the live model); the live
    model is not touched. Until a position: its partition stops right after that event. Both
    the same when the build pass runs in worker processes."""
    sources_in_workers: list[str] = []
    in_workers = rebuild_module.replay_in_workers

    async def spy(*args: Any, **kwargs: Any) -> None:
        sources_in_workers.append(str(kwargs.get("source")))
        await in_workers(*args, **kwargs)

    monkeypatch.setattr(rebuild_module, "replay_in_workers", spy)
    events, _ = workload(rooms=10, users=16, messages=1200, seed=21)
    await produce(world.store, events)
    await asyncio.sleep(0.05)
    until = dt.datetime.now(dt.UTC)
    await asyncio.sleep(0.05)
    rooms = rooms_and_senders(events)
    later = [message(*rooms[0], f"after T {n}") for n in range(20)]
    for event in later[:10]:  # one at a time: offsets in order within the room's partition
        await world.write([event])
    await world.write([message(*room, f"after T elsewhere {n}") for n, room in enumerate(rooms)])
    await world.catch_up()
    live_before = await clean_checksum(world, "live_copy")

    result = await Rebuild(world.store, batch=300, until=Until(time=until), into="pit").run()
    assert result.schema == "pit"
    assert result.replaced is None
    expected = await checksum_up_to(world, until)
    assert result.checksum == expected
    async with world.store.pool.acquire() as conn:
        assert await checksum(conn, "pit") == expected
    assert sources_in_workers == [], "a short pass runs in this process"
    # Small batches make the build pass long enough for worker processes; same bound, same model.
    parallel = await Rebuild(
        world.store, batch=40, workers=2, until=Until(time=until), into="pit_workers"
    ).run()
    assert len(sources_in_workers) == 1
    assert "kafka" in sources_in_workers[0]
    assert parallel.checksum == expected
    assert await bodies(world, "pit", "after T") == []
    assert len(await bodies(world, "chat", "after T")) == 10 + len(rooms)
    assert len(await bodies(world, "chat", "")) > len(await bodies(world, "pit", ""))
    async with world.store.pool.acquire() as conn:
        assert await checksum(conn, "chat") == live_before, "the live model is untouched"

    # Until a position token: the partition it names stops right after that event (the next
    # message, appended with it, is absent), every other partition at its time.
    recorded = await world.store.producer.append(later[10:13])
    token = recorded[1].position.token()
    await world.catch_up()
    await Rebuild(world.store, batch=300, until=Until.parse(token), into="pit_pos").run()
    everything = await bodies(world, "chat", "after T")
    assert "after T 12" in everything
    assert sorted(await bodies(world, "pit_pos", "after T")) == sorted(
        b for b in everything if b != "after T 12"
    )
    in_workers_pos = await Rebuild(
        world.store, batch=40, workers=2, until=Until.parse(token), into="pit_pos_workers"
    ).run()
    async with world.store.pool.acquire() as conn:
        assert in_workers_pos.checksum == await checksum(conn, "pit_pos")
    assert len(sources_in_workers) == 2
    assert await schema_exists(world.store.pool, "chat")


async def test_a_replay_from_the_archive_equals_one_from_kafka(
    world: World, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After archiving the log: a replay from S3 (swapped in) and one from Kafka (into a schema
    of its own) have the same checksum, equal to a clean replay. The archive is where the
    archiver's settings put it (``BACKBONE_ARCHIVE_BUCKET`` / ``_PREFIX``), and the replay
    reads it there."""
    events, _ = workload(rooms=12, users=20, messages=2000, seed=9)
    await produce(world.store, events)
    with contextlib.suppress(ClientError):  # made by an earlier run
        await asyncio.to_thread(client.create_bucket, Bucket=OTHER_BUCKET)
    monkeypatch.setenv("BACKBONE_ARCHIVE_BUCKET", OTHER_BUCKET)
    monkeypatch.setenv("BACKBONE_ARCHIVE_PREFIX", f"elsewhere-{uuid.uuid4().hex[:8]}")
    config = ArchiveConfig.from_env(world.settings, os.environ)
    archive = Archive(client, config.bucket, config.prefix)
    await archive_log(world.settings, archive, segment_records=250)

    from_kafka = await Rebuild(world.store, batch=400, workers=2, into="from_kafka").run()
    from_s3 = await cli_replay(world.settings, "chat", batch=400, on_progress=None, source="s3")
    assert from_s3.schema == "chat"
    assert from_s3.records == from_kafka.records == len(events)
    assert from_s3.positions == from_kafka.positions
    assert from_s3.checksum == from_kafka.checksum == await clean_checksum(world)


async def test_a_replay_from_an_archive_without_records_is_refused(world: World) -> None:
    """``replay --from s3`` pointed at a location that holds no record (a wrong bucket or
    prefix) refuses, naming it, and swaps nothing in: the live model stays as it was."""
    events, _ = workload(rooms=3, users=4, messages=40, seed=3)
    await produce(world.store, events)
    await world.catch_up()
    async with world.store.pool.acquire() as conn:
        live = await checksum(conn, "chat")
        messages = await conn.fetchval("SELECT count(*) FROM chat.messages")
    assert messages > 0
    prefix = f"nothing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ReplaySourceError, match=f"s3://{ARCHIVE_BUCKET}/{prefix}/ holds no record"):
        await cli_replay(
            world.settings,
            "chat",
            batch=400,
            on_progress=None,
            source="s3",
            env={"BACKBONE_ARCHIVE_PREFIX": prefix},
        )
    async with world.store.pool.acquire() as conn:
        assert await checksum(conn, "chat") == live
        assert await conn.fetchval("SELECT count(*) FROM chat.messages") == messages


def test_until_needs_into() -> None:
    """The CLI refuses ``--until`` without ``--into`` (a past model is never swapped in) and an
    ``--until`` that is neither a time with a zone nor a position."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--until", "2026-01-01T00:00:00Z"])
    with pytest.raises(SystemExit):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "--until", "2026-01-01T00:00:00", "--into", "pit"])
    args = parser.parse_args(["replay", "--until", "1.c.3.42", "--into", "pit", "--from", "s3"])
    assert args.until == Until.parse("1.c.3.42")
    assert args.source == "s3"


def test_a_cut_keeps_each_chunk_up_to_the_first_record_past_its_bound() -> None:
    """No bound keeps every record; a time keeps each partition up to its first later record;
    a position's partition is kept up to that offset, the others by its event time."""
    here, there = ("t.conversations", 0), ("t.conversations", 1)

    def chunk(partition: tuple[str, int]) -> list[SourceRecord]:
        times = [100, 200, 300, 250, 400]  # not monotonic: the first one past the bound cuts
        return [SourceRecord(*partition, n, t, b"v", []) for n, t in enumerate(times)]

    def offsets(records: list[SourceRecord]) -> list[int]:
        return [r.offset for r in records]

    everything = chunk(here)
    assert Cut(None).kept(here, everything) is everything
    assert offsets(Cut(250).kept(here, chunk(here))) == [0, 1]
    assert offsets(Cut(50).kept(here, chunk(here))) == []
    assert offsets(Cut(400).kept(here, chunk(here))) == [0, 1, 2, 3, 4]
    at_position = Cut(300, here, 3)
    assert offsets(at_position.kept(here, chunk(here))) == [0, 1, 2, 3]
    assert offsets(at_position.kept(there, chunk(there))) == [0, 1, 2, 3]
    assert offsets(Cut(200, here, 3).kept(there, chunk(there))) == [0, 1]
