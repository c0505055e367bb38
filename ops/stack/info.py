"""What the local stack tells its users: addresses and credentials, and per-part status."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def replication_factor(brokers: int) -> int:
    """Replication factor of event topics for a cluster of `brokers` nodes (3 in production)."""
    return min(brokers, 3)


def min_insync_replicas(brokers: int) -> int:
    """`min.insync.replicas` for `brokers` nodes: 2 of 3 in production, 1 on a single broker."""
    return 2 if brokers >= 3 else 1


@dataclass(frozen=True)
class StackInfo:
    """Where every server of a running local stack listens, and how to log in to it."""

    data_dir: Path
    brokers: int
    kafka_bootstrap: str
    postgres_dsn: str
    redis_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str

    def env(self) -> dict[str, str]:
        """The `BACKBONE_*` environment that points the project's processes at this stack."""
        return {
            "BACKBONE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "BACKBONE_KAFKA_REPLICATION_FACTOR": str(replication_factor(self.brokers)),
            "BACKBONE_KAFKA_MIN_INSYNC": str(min_insync_replicas(self.brokers)),
            "BACKBONE_POSTGRES_DSN": self.postgres_dsn,
            "BACKBONE_REDIS_URL": self.redis_url,
            "BACKBONE_S3_ENDPOINT": self.s3_endpoint,
            "BACKBONE_S3_ACCESS_KEY": self.s3_access_key,
            "BACKBONE_S3_SECRET_KEY": self.s3_secret_key,
            "BACKBONE_S3_REGION": self.s3_region,
        }


@dataclass(frozen=True)
class PartStatus:
    """One server of the stack as `backbone stack status` shows it.

    Kafka is one row named `kafka` on a single broker, and one row per node (`kafka-1`,
    `kafka-2`, ...) on a multi-broker stack.
    """

    name: str
    address: str
    running: bool
    pid: int | None
    log: Path
