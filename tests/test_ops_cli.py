"""The operator commands: ``dlq list|retry``, ``status``, ``checksum``, ``replay``, ``provision``,
``caches rebuild``.

Each command runs through ``backbone``'s own entry point (in a worker thread, as it starts an
event loop of its own) against an isolated deployment named by the ``BACKBONE_*`` environment.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from eventstore import Settings, create_pool
from ops.cli import main
from ops.provision import provision
from projectors.caches import fence_key, summary_key
from projectors.checksum import checksum
from projectors.read.contract import LIVE_SCHEMA, members_key, user_conversations_key
from projectors.schema import schema_exists
from tests.store_fixtures import fresh_database
from tests.test_projector_support import (
    World,
    group,
    message,
    register,
    settings_env,
    world_fixture,  # noqa: F401 - provides the `world` fixture
)


async def backbone(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    settings: Settings,
    *argv: str,
    stderr: bool = False,
) -> tuple[int, str]:
    """Run ``backbone argv`` against ``settings``; its exit status and stdout (or stderr)."""
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    status = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return status, captured.err if stderr else captured.out


async def test_dlq_list_and_retry(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message to a conversation that does not exist yet is dead-lettered; once the
    conversation exists, ``dlq retry`` applies it and ``dlq list`` is empty again."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    early = message(room, owner, "too early")
    (recorded,) = await world.write([early])
    await world.write([register(owner)])
    await world.catch_up()

    status, out = await backbone(monkeypatch, capsys, world.settings, "dlq", "list", "--json")
    assert status == 0
    (letter,) = json.loads(out)
    position = recorded.position
    assert (letter["partition"], letter["offset"]) == (position.partition, position.offset)
    assert letter["reason"] == "projection"

    topic = world.store.layout.topic("conversation")
    args = ("dlq", "retry", topic, str(position.partition), str(position.offset))
    status, out = await backbone(monkeypatch, capsys, world.settings, *args)
    assert status == 1, "still no such conversation: the retry fails again"
    assert "failed again" in out

    await world.write([group(room, owner)])
    await world.catch_up()
    status, out = await backbone(monkeypatch, capsys, world.settings, "dlq", "retry", "--all")
    assert status == 0
    assert out.strip() == f"{topic}/{position.partition}/{position.offset}: applied"
    body = await world.store.pool.fetchval(
        "SELECT body FROM chat.messages WHERE message_id = $1", early.message_id
    )
    assert body == "too early"
    status, out = await backbone(monkeypatch, capsys, world.settings, "dlq", "list")
    assert (status, out.strip()) == (0, "no dead letters")


async def test_status_reports_lag_and_last_applied_per_partition(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lag is the log end minus the read model's next offset, per partition; it drops to zero
    once the projector applied everything, and the last-applied positions are reported."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    await world.write([register(owner), group(room, owner)])
    written = await world.write([message(room, owner, f"m{n}") for n in range(5)])

    status, out = await backbone(monkeypatch, capsys, world.settings, "status", "--json")
    document = json.loads(out)
    assert document["epoch"] == world.store.epoch
    assert document["projector"]["lag"] == 7
    assert {p["name"] for p in document["stack"]} >= {"postgres", "redis"}
    assert status == 0

    await world.catch_up()
    status, out = await backbone(monkeypatch, capsys, world.settings, "status", "--json")
    projector = json.loads(out)["projector"]
    assert projector["lag"] == 0
    last = {p["last_applied"] for p in projector["partitions"] if p["last_applied"]}
    assert written[-1].position.token() in last

    status, out = await backbone(monkeypatch, capsys, world.settings, "status")
    assert "lag 0 records" in out
    assert written[-1].position.token() in out


async def test_checksum_and_replay_commands(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``replay --json`` ends with a result line whose checksum ``checksum`` then prints."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    await world.write([register(owner), group(room, owner)])
    await world.write([message(room, owner, f"m{n}") for n in range(20)])
    await world.catch_up()
    async with world.store.pool.acquire() as conn:
        live = await checksum(conn, LIVE_SCHEMA)

    status, out = await backbone(monkeypatch, capsys, world.settings, "replay", "--json")
    assert status == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["event"] == "result"
    assert result["records"] == 22
    assert result["checksum"] == live, "a replay of the same log is byte-identical"

    status, out = await backbone(monkeypatch, capsys, world.settings, "checksum", "--json")
    assert status == 0
    assert json.loads(out) == {"schema": "chat", "checksum": live}
    status, _ = await backbone(
        monkeypatch, capsys, world.settings, "checksum", "--schema", "nothing_here"
    )
    assert status == 1


async def test_caches_rebuild_restores_what_redis_lost(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``caches rebuild`` after Redis lost the projector's keys: every members hash, user's
    conversation set and summary is back as the projector had written it, and the fences at
    the model's offsets; without a read model it fails and says why."""
    owner, bob, rooms = uuid.uuid4(), uuid.uuid4(), [uuid.uuid4() for _ in range(3)]
    await world.write([register(owner), register(bob)])
    await world.write([group(room, owner, bob) for room in rooms])
    await world.write([message(room, bob, f"hi {n}") for n, room in enumerate(rooms)])
    await world.catch_up()
    keys = [
        *(members_key(world.namespace, room) for room in rooms),
        *(summary_key(world.namespace, room) for room in rooms),
    ]
    sets = [user_conversations_key(world.namespace, user) for user in (owner, bob)]

    async def cached() -> list[object]:
        hashes = [await world.redis.hgetall(key) for key in [*keys, fence_key(world.namespace)]]
        return [*hashes, *[await world.redis.smembers(key) for key in sets]]

    before = await cached()
    assert all(before), "the projector wrote every one of them"
    await world.redis.delete(*keys, *sets, fence_key(world.namespace))

    status, out = await backbone(monkeypatch, capsys, world.settings, "caches", "rebuild", "--json")
    assert status == 0
    assert json.loads(out) == {"schema": "chat", "conversations": 3, "users": 2, "summaries": 3}
    assert await cached() == before

    bare = await fresh_database(world.settings)
    status, err = await backbone(monkeypatch, capsys, bare, "caches", "rebuild", stderr=True)
    assert status == 1
    assert "no read model" in err


async def test_provision_creates_the_live_read_model(base_settings: Settings) -> None:
    """Any tier can start first: provisioning alone leaves the read model's tables in place."""
    settings = await fresh_database(base_settings)
    await provision(settings)
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        assert await schema_exists(pool, LIVE_SCHEMA)
        assert await pool.fetchval("SELECT count(*) FROM chat.messages") == 0
    finally:
        await pool.close()
