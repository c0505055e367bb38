"""`compose.yaml` describes the same system as the local stack (it cannot run here: no Docker).

It must parse, name every part `backbone stack up` runs plus the three tiers, and hand the
tiers exactly the environment `StackInfo.env()` defines, pointing at the compose services.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ops.stack import StackInfo

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
STACK_PARTS = ("kafka", "postgres", "redis", "s3")
TIERS = ("ingest", "projectors", "fanout")


def env_names() -> set[str]:
    """The variable names the local stack exports (addresses are irrelevant here)."""
    info = StackInfo(
        data_dir=Path("/nonexistent"),
        brokers=1,
        kafka_bootstrap="127.0.0.1:1",
        postgres_dsn="postgresql://u:p@127.0.0.1:2/db",
        redis_url="redis://127.0.0.1:3/0",
        s3_endpoint="http://127.0.0.1:4",
        s3_access_key="a",
        s3_secret_key="s",
        s3_region="us-east-1",
    )
    return set(info.env())


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    found = document["services"]
    assert isinstance(found, dict)
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, written either as a mapping or as a list of K=V strings."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def test_every_part_of_the_local_stack_is_a_service(services: dict[str, Any]) -> None:
    assert set(STACK_PARTS) <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["s3"]["image"].startswith("andrewgaul/s3proxy:")


def test_kafka_runs_kraft_without_auto_created_topics(services: dict[str, Any]) -> None:
    env = environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"


def test_redis_persists_with_the_append_only_file(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_s3proxy_uses_the_filesystem_backend(services: dict[str, Any]) -> None:
    env = environment(services["s3"])
    assert env["JCLOUDS_PROVIDER"].startswith("filesystem")
    assert env["S3PROXY_AUTHORIZATION"] == "aws-v2-or-v4"


@pytest.mark.parametrize("tier", TIERS)
def test_tiers_get_the_stack_environment(services: dict[str, Any], tier: str) -> None:
    service = services[tier]
    assert service["build"] == {"context": ".", "dockerfile": "ops/Dockerfile"}
    assert (ROOT / "ops" / "Dockerfile").is_file()
    assert "BACKBONE_MASTER_KEY" in environment(service)
    assert service["command"][:3] == ["backbone", "serve", tier]
    env = environment(service)
    assert env_names() <= set(env)
    assert env["BACKBONE_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert urlsplit(env["BACKBONE_POSTGRES_DSN"]).hostname == "postgres"
    assert urlsplit(env["BACKBONE_REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["BACKBONE_S3_ENDPOINT"]).hostname == "s3"
    s3 = environment(services["s3"])
    assert env["BACKBONE_S3_ACCESS_KEY"] == s3["S3PROXY_IDENTITY"]
    assert env["BACKBONE_S3_SECRET_KEY"] == s3["S3PROXY_CREDENTIAL"]
