"""Schema evolution: stored payloads of every version ever written still decode.

``tests/fixtures/events/*.json`` hold records exactly as they were written (headers, value
bytes, and the test data key that sealed them). They are never regenerated: when an event
gains a version, add fixtures for the new version and keep the old ones; the upcaster chain
in ``schemas/upcasting.py`` must bring each to the current type.

To add fixtures for the current catalog: ``python -m tests.test_upcasting write``.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore import TopicLayout
from eventstore.codec import RecordedEvent, encode_event, finish, parse_record
from schemas import EVENT_CLASSES, Envelope, UpcastError, Upcasters, parse_time
from schemas.upcasting import UPCASTERS

FIXTURES = Path(__file__).parent / "fixtures" / "events"
LAYOUT = TopicLayout("chat", 4, 8, 1, 1)


class Record(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]


def load(path: Path) -> tuple[Record, dict[uuid.UUID, AESGCM | None], dict[str, Any]]:
    data = json.loads(path.read_text())
    record = Record(
        data["topic"],
        0,
        0,
        data["value"].encode(),
        [(name, value.encode()) for name, value in data["headers"]],
    )
    keys: dict[uuid.UUID, AESGCM | None] = {
        uuid.UUID(s): AESGCM(base64.b64decode(k)) for s, k in data["data_keys"].items()
    }
    return record, keys, data["expected"]


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_every_stored_fixture_decodes_to_the_current_type(path: Path) -> None:
    record, keys, expected = load(path)
    decoded = finish(parse_record(record, LAYOUT, 1), keys)
    assert isinstance(decoded, RecordedEvent), decoded
    assert msgspec.json.decode(msgspec.json.encode(decoded.event)) == expected


def test_fixtures_cover_every_event_type() -> None:
    """A new event type must come with a stored fixture."""
    stored = {load(p)[0].headers[3][1].decode() for p in FIXTURES.glob("*.json")}
    assert {cls.type_name() for cls in EVENT_CLASSES} <= stored


def test_upcasters_chain_from_an_old_version_to_the_current_one() -> None:
    registry = Upcasters()

    @registry.register("chat.thing.done", 1)
    def rename(p: dict[str, Any]) -> dict[str, Any]:
        p["body"] = p.pop("text")
        return p

    @registry.register("chat.thing.done", 2)
    def add_kind(p: dict[str, Any]) -> dict[str, Any]:
        p.setdefault("kind", "text")
        return p

    stored = {"text": "hi"}
    assert registry.upcast("chat.thing.done", 1, 3, stored) == {"body": "hi", "kind": "text"}
    assert stored == {"text": "hi"}, "the stored payload is not mutated"
    assert registry.upcast("chat.thing.done", 3, 3, {"body": "x"}) == {"body": "x"}


def test_a_missing_step_or_a_newer_version_is_an_error() -> None:
    registry = Upcasters()
    with pytest.raises(UpcastError, match="no upcaster"):
        registry.upcast("chat.thing.done", 1, 2, {})
    with pytest.raises(UpcastError, match="newer than this reader"):
        registry.upcast("chat.thing.done", 3, 2, {})


def test_the_shipped_registry_has_a_step_for_every_version_below_current() -> None:
    for cls in EVENT_CLASSES:
        for version in range(1, cls.version):
            assert (cls.type_name(), version) in UPCASTERS.steps()


def write_fixtures() -> None:  # pragma: no cover - run by hand, see module docstring
    from tests.samples import sample_events

    key = AESGCM.generate_key(256)
    for event in sample_events():
        envelope = Envelope(
            id=uuid.UUID("0190a1b2-0000-7000-8000-0000000e0e01"),
            source="urn:backbone",
            type=event.type_name(),
            subject=str(event.stream_id),
            time=parse_time("2026-11-25T12:00:00.000Z"),
            schemaversion=event.version,
            actor=str(event.stream_id),
        )
        subject = event.subject_id
        keys = {subject: AESGCM(key)} if subject else {}
        out = encode_event(event, envelope, keys, LAYOUT)
        path = FIXTURES / f"{event.type_name()}.v{event.version}.json"
        if path.exists():
            continue
        path.write_text(
            json.dumps(
                {
                    "topic": out.topic,
                    "headers": [[n, v.decode()] for n, v in out.headers],
                    "value": out.value.decode(),
                    "data_keys": {str(subject): base64.b64encode(key).decode()} if subject else {},
                    "expected": msgspec.to_builtins(event),
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )


if __name__ == "__main__" and sys.argv[1:] == ["write"]:
    write_fixtures()
