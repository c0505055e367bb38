"""Configuration is read once and a bad value stops start-up naming the variable."""

from __future__ import annotations

import base64

import pytest

from eventstore import ConfigError, load_settings

KEY = base64.b64encode(bytes(range(32))).decode()
GOOD = {
    "BACKBONE_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "BACKBONE_POSTGRES_DSN": "postgresql://u:p@127.0.0.1:5432/db",
    "BACKBONE_REDIS_URL": "redis://127.0.0.1:6379/0",
    "BACKBONE_MASTER_KEY": KEY,
}


def test_good_settings_load() -> None:
    settings = load_settings(GOOD)
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.master_key.key_id == "k1"
    assert settings.master_key.key == bytes(range(32))


def test_several_master_keys_keep_their_ids_and_the_first_is_current() -> None:
    other = base64.b64encode(b"\x01" * 32).decode()
    settings = load_settings({**GOOD, "BACKBONE_MASTER_KEY": f"new:{other},old:{KEY}"})
    assert [k.key_id for k in settings.master_keys] == ["new", "old"]
    assert settings.master_key.key_id == "new"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"BACKBONE_MASTER_KEY": ""}, "BACKBONE_MASTER_KEY is not set"),
        ({"BACKBONE_MASTER_KEY": "not base64!"}, "BACKBONE_MASTER_KEY"),
        ({"BACKBONE_MASTER_KEY": base64.b64encode(b"short").decode()}, "needs 32"),
        ({"BACKBONE_KAFKA_BOOTSTRAP": ""}, "BACKBONE_KAFKA_BOOTSTRAP is not set"),
        ({"BACKBONE_KAFKA_BOOTSTRAP": "localhost"}, "BACKBONE_KAFKA_BOOTSTRAP"),
        ({"BACKBONE_POSTGRES_DSN": "mysql://x"}, "BACKBONE_POSTGRES_DSN"),
        ({"BACKBONE_REDIS_URL": "http://x"}, "BACKBONE_REDIS_URL"),
        ({"BACKBONE_SEND_TIMEOUT": "soon"}, "BACKBONE_SEND_TIMEOUT"),
        (
            {"BACKBONE_KAFKA_MIN_INSYNC": "2", "BACKBONE_KAFKA_REPLICATION_FACTOR": "1"},
            "BACKBONE_KAFKA_MIN_INSYNC",
        ),
    ],
)
def test_a_bad_setting_is_refused_by_name(override: dict[str, str], named: str) -> None:
    env = {k: v for k, v in {**GOOD, **override}.items() if v != ""}
    with pytest.raises(ConfigError, match=named):
        load_settings(env)
