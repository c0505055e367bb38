"""The local stack against its real servers: every part answers, `up` is idempotent, a
three-node Kafka cluster survives losing a node, and a part that cannot start says why."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import asyncpg
import boto3
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from botocore.config import Config

from ops.stack import (
    KafkaCluster,
    StackError,
    StackInfo,
    default_stack_dir,
    stack_status,
    stack_up,
)
from ops.stack.ports import ephemeral_port
from ops.stack.s3 import BUCKETS

ENV_NAMES = {
    "BACKBONE_KAFKA_BOOTSTRAP",
    "BACKBONE_KAFKA_REPLICATION_FACTOR",
    "BACKBONE_KAFKA_MIN_INSYNC",
    "BACKBONE_POSTGRES_DSN",
    "BACKBONE_REDIS_URL",
    "BACKBONE_S3_ENDPOINT",
    "BACKBONE_S3_ACCESS_KEY",
    "BACKBONE_S3_SECRET_KEY",
    "BACKBONE_S3_REGION",
}


async def create_topic(bootstrap: str, topic: str, replication: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=replication)]
        )
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, value: bytes) -> int:
    """Send one record with acks=all; return its offset once acknowledged."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=30000
    )
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, value, key=b"key")
    finally:
        await producer.stop()
    offset: int = metadata.offset
    return offset


async def consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The first `count` record values of `topic`, read without a consumer group."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < count:
                record = await consumer.getone()
                values.append(record.value)
    finally:
        await consumer.stop()
    return values


def test_env_names_the_stack(stack: StackInfo) -> None:
    env = stack.env()
    assert set(env) == ENV_NAMES
    assert env["BACKBONE_KAFKA_BOOTSTRAP"] == stack.kafka_bootstrap
    assert env["BACKBONE_KAFKA_REPLICATION_FACTOR"] == "1"
    assert env["BACKBONE_KAFKA_MIN_INSYNC"] == "1"
    assert stack.postgres_dsn.startswith("postgresql://backbone:backbone@127.0.0.1:")
    assert stack.redis_url.startswith("redis://127.0.0.1:")
    assert stack.s3_endpoint.startswith("http://127.0.0.1:")
    assert stack.data_dir == default_stack_dir()


async def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def test_kafka_round_trip(stack: StackInfo) -> None:
    topic = f"stack-test-{uuid.uuid4().hex[:12]}"
    await create_topic(stack.kafka_bootstrap, topic, replication=1)
    try:
        offset = await produce(stack.kafka_bootstrap, topic, b"hello")
        assert offset == 0
        assert await consume(stack.kafka_bootstrap, topic, 1) == [b"hello"]
    finally:
        # The session stack is shared (and often kept): leave no test topics behind.
        await delete_topic(stack.kafka_bootstrap, topic)


async def test_postgres_answers_with_durable_settings(stack: StackInfo) -> None:
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("show fsync") == "on"
        assert await conn.fetchval("show synchronous_commit") == "on"
        # bench project reads when each row became visible from the commit times.
        assert await conn.fetchval("show track_commit_timestamp") == "on"
        assert await conn.fetchval("select rolcreatedb from pg_roles where rolname = current_user")
    finally:
        await conn.close()


async def test_redis_answers_with_append_only_persistence(stack: StackInfo) -> None:
    client = aioredis.from_url(stack.redis_url, decode_responses=True)
    try:
        assert await client.ping()
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
        assert await client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        await client.aclose()


def test_s3_buckets_store_objects(stack: StackInfo) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key,
        region_name=stack.s3_region,
        config=Config(s3={"addressing_style": "path"}),
    )
    try:
        for bucket in BUCKETS:
            key = f"stack-test/{uuid.uuid4().hex}"
            client.put_object(Bucket=bucket, Key=key, Body=b"payload " + bucket.encode())
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert body == b"payload " + bucket.encode()
            client.delete_object(Bucket=bucket, Key=key)
    finally:
        client.close()


def test_status_lists_every_part(stack: StackInfo) -> None:
    rows = {row.name: row for row in stack_status(stack.data_dir)}
    assert set(rows) == {"kafka", "postgres", "redis", "s3"}
    for row in rows.values():
        assert row.running, row
        assert row.pid is not None
        assert row.log.is_file()
    assert rows["kafka"].address == stack.kafka_bootstrap
    assert stack.redis_url == f"redis://{rows['redis'].address}/0"
    assert stack.s3_endpoint == f"http://{rows['s3'].address}"


def test_second_up_reuses_every_server(stack: StackInfo) -> None:
    before = {row.name: row.pid for row in stack_status(stack.data_dir)}
    again = stack_up(stack.data_dir)
    after = {row.name: row.pid for row in stack_status(stack.data_dir)}
    assert again == stack
    assert after == before
    assert None not in after.values()


@pytest.mark.fault
async def test_three_node_cluster_survives_a_killed_node(tmp_path: Path) -> None:
    """All the three-broker checks in one test: each cluster start costs three JVMs."""
    cluster = KafkaCluster(tmp_path / "kafka3", brokers=3)
    bootstrap = await asyncio.to_thread(cluster.start)
    try:
        assert cluster.node_ids == (1, 2, 3)
        assert bootstrap == cluster.bootstrap
        assert bootstrap == ",".join(f"127.0.0.1:{cluster.port_of(n)}" for n in (1, 2, 3))
        first = f"rf3-{uuid.uuid4().hex[:12]}"
        await create_topic(bootstrap, first, replication=3)
        await produce(bootstrap, first, b"before")

        await asyncio.to_thread(cluster.kill, 2)
        assert not cluster.running(2)
        assert [row.running for row in cluster.status()] == [True, False, True]
        # Two of three replicas satisfy min.insync.replicas=2: acks=all still succeeds.
        await produce(bootstrap, first, b"during")

        await asyncio.to_thread(cluster.restart, 2)
        assert cluster.running(2)
        second = f"rf3-{uuid.uuid4().hex[:12]}"
        await create_topic(bootstrap, second, replication=3)
        await produce(bootstrap, second, b"after")
        assert await consume(bootstrap, first, 2) == [b"before", b"during"]
        assert await consume(bootstrap, second, 1) == [b"after"]
    finally:
        await asyncio.to_thread(cluster.stop)
    assert not any(row.running for row in cluster.status())


def test_kafka_that_cannot_bind_its_port_fails_clearly(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        controller = ephemeral_port()
        cluster = KafkaCluster(
            tmp_path / "clash",
            extra_config={
                "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
                "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
                "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            },
        )
        try:
            with pytest.raises(StackError) as caught:
                cluster.start()
        finally:
            cluster.stop()
    error = caught.value
    log = tmp_path / "clash" / "logs" / "kafka-1.log"
    assert error.part == "kafka"
    assert error.log == log
    assert log.is_file()
    message = str(error)
    assert message.startswith("kafka: ")
    assert "exited with code" in message
    assert str(log) in message
    assert f"failed to bind to 127.0.0.1:{port}" in message
