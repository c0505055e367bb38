"""The event topics: their names, layout and configuration, and how they are provisioned.

Two topics hold every event: one for user streams (keyed by user id) and one for conversation
streams (keyed by conversation id). Both keep events forever (``retention.ms=-1``), never elect
an out-of-sync leader, and refuse writes below ``min.insync.replicas``.
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from eventstore.errors import ConfigError, LogUnavailable
from eventstore.settings import Settings
from schemas.events import StreamKind

TOPIC_ALREADY_EXISTS: Final = 36


class TopicLayout(msgspec.Struct, frozen=True, cache_hash=True):
    """Names and partition counts of the event topics for one deployment."""

    prefix: str
    user_partitions: int
    conversation_partitions: int
    replication_factor: int
    min_insync: int

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicLayout:
        return cls(
            prefix=settings.topic_prefix,
            user_partitions=settings.user_partitions,
            conversation_partitions=settings.conversation_partitions,
            replication_factor=settings.kafka_replication_factor,
            min_insync=settings.kafka_min_insync,
        )

    def topic(self, stream: StreamKind) -> str:
        """The topic holding streams of this kind."""
        return f"{self.prefix}.{stream}s"

    def stream_of(self, topic: str) -> StreamKind:
        """The stream kind a topic holds; :class:`ConfigError` for a foreign topic."""
        for stream in ("user", "conversation"):
            if topic == self.topic(stream):
                return stream
        raise ConfigError(f"topic {topic!r} is not an event topic of prefix {self.prefix!r}")

    @property
    def topics(self) -> tuple[str, str]:
        return (self.topic("user"), self.topic("conversation"))

    def partitions(self, stream: StreamKind) -> int:
        return self.user_partitions if stream == "user" else self.conversation_partitions

    def every_partition(self) -> list[tuple[str, int]]:
        """Every (topic, partition) of the event topics."""
        return [
            (self.topic(stream), p)
            for stream in ("user", "conversation")
            for p in range(self.partitions(stream))
        ]

    def topic_config(self) -> dict[str, str]:
        """Broker-side settings every event topic carries."""
        return {
            # The log is the system of record: never delete by age or size.
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "cleanup.policy": "delete",
            # An out-of-sync replica becoming leader would silently drop acknowledged events.
            "unclean.leader.election.enable": "false",
            "min.insync.replicas": str(self.min_insync),
            # Keep the producer's timestamp: it is the event time clients see.
            "message.timestamp.type": "CreateTime",
        }


async def provision_topics(bootstrap: str, layout: TopicLayout) -> list[str]:
    """Create the event topics that are missing; return the names created. Idempotent.

    Existing topics are checked: a partition count other than the layout's is a
    :class:`ConfigError`, because keys would map to other partitions than before.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        await admin.start()
        existing = {t["topic"]: t for t in await admin.describe_topics(list(layout.topics))}
        wanted: list[NewTopic] = []
        for stream in ("user", "conversation"):
            name = layout.topic(stream)
            meta = existing.get(name)
            if meta is not None and meta.get("error_code", 0) == 0 and meta["partitions"]:
                have = len(meta["partitions"])
                if have != layout.partitions(stream):
                    raise ConfigError(
                        f"topic {name} has {have} partitions, the layout wants "
                        f"{layout.partitions(stream)}; refusing to repartition an event log"
                    )
                continue
            wanted.append(
                NewTopic(
                    name=name,
                    num_partitions=layout.partitions(stream),
                    replication_factor=layout.replication_factor,
                    topic_configs=layout.topic_config(),
                )
            )
        if not wanted:
            return []
        response = await admin.create_topics(wanted, timeout_ms=30000)
        created: list[str] = []
        for topic, code, *rest in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TOPIC_ALREADY_EXISTS:
                message = rest[0] if rest else ""
                raise ConfigError(f"creating topic {topic} failed: error {code} {message}")
        return created
    except KafkaError as exc:
        raise LogUnavailable(f"Kafka at {bootstrap} is unreachable: {exc}") from exc
    finally:
        await admin.close()
