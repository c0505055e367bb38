"""``backbone bench fanout`` (idle sockets, deliveries) runs with tiny counts, writes valid
JSON and leaves nothing behind on the shared stack.

Only the command is tested here, never its figures: timings belong to the benchmark run.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from eventstore import Settings
from ops.cli import main
from ops.stack import StackInfo
from tests.test_projector_drills import free_port


async def _leftovers(settings: Settings, prefix: str) -> tuple[int, int, int]:
    """Member rows of the live model, Redis keys and topics of the deployment ``prefix``."""
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        members = await conn.fetchval("SELECT count(*) FROM chat.members")
    finally:
        await conn.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        keys = len([k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)])
    finally:
        await redis.aclose()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        topics = len([t for t in await admin.list_topics() if t.startswith(prefix + ".")])
    finally:
        await admin.close()
    return members, keys, topics


async def test_bench_fanout_delivers_and_cleans_up(
    stack: StackInfo, base_settings: Settings, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(base_settings.postgres_dsn)
    try:
        members = await conn.fetchval("SELECT count(*) FROM chat.members")
    finally:
        await conn.close()
    out = tmp_path / "fanout.json"
    argv = ["bench", "fanout", "--subjects", "idle,deliveries", "--connections", "40"]
    argv += ["--conversations", "4", "--seconds", "1", "--producers", "1"]
    argv += ["--port", str(free_port()), "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 0
    document = json.loads(out.read_text())
    assert document["bench"] == "fanout"
    rows = {r["name"]: r for r in document["results"]}
    assert rows["idle sockets (connect+auth)"]["count"] == 40
    assert rows["deliveries by one process"]["count"] > 0
    left = await _leftovers(base_settings, document["deployment"])
    assert left == (members, 0, 0), "no member rows, keys or topics left"
