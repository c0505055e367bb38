"""The event catalog: every required type exists, tags are unique, limits are enforced."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from schemas import ERASED, EVENT_CLASSES, EVENT_TYPES, AnyEvent, MessageSent, UserRegistered
from schemas.envelope import name_based_id
from schemas.fields import MESSAGE_BODY_MAX, USERNAME_MAX
from tests.samples import ALICE, ROOM, sample_events

REQUIRED = {
    "UserRegistered",
    "UserProfileUpdated",
    "PasswordChanged",
    "SessionStarted",
    "SessionRevoked",
    "ConversationCreated",
    "DirectConversationOpened",
    "MemberJoined",
    "MemberLeft",
    "MemberRoleChanged",
    "MessageSent",
    "MessageEdited",
    "MessageDeleted",
    "ReactionAdded",
    "ReactionRemoved",
    "ReadMarkerMoved",
    "MediaUploaded",
    "UserErased",
}


def test_catalog_holds_every_required_event_with_a_unique_type() -> None:
    """All v1 events exist, each with its own CloudEvents type under the chat. namespace."""
    assert {cls.__name__ for cls in EVENT_CLASSES} == REQUIRED
    assert len(EVENT_TYPES) == len(EVENT_CLASSES)
    assert all(name.startswith("chat.") for name in EVENT_TYPES)


def test_samples_cover_the_catalog_and_round_trip_through_the_union() -> None:
    """Every event encodes to JSON and decodes back, by its tag, to an equal value."""
    samples = sample_events()
    assert {type(e) for e in samples} == set(EVENT_CLASSES)
    for event in samples:
        assert msgspec.json.decode(msgspec.json.encode(event), type=AnyEvent) == event


def test_personal_fields_name_real_fields_and_a_subject() -> None:
    """Every declared personal field exists and every event with one names its subject."""
    for cls in EVENT_CLASSES:
        for name in cls.personal_fields:
            assert name in cls.__struct_fields__, (cls.__name__, name)
        if cls.personal_fields:
            assert cls.subject_field in cls.__struct_fields__, cls.__name__
        assert cls.stream_field in cls.__struct_fields__, cls.__name__


def test_stream_id_is_the_conversation_or_the_user() -> None:
    by_type = {type(e): e for e in sample_events()}
    assert by_type[MessageSent].stream_id == ROOM
    assert by_type[UserRegistered].stream_id == ALICE
    assert by_type[MessageSent].subject_id == ALICE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body", "x" * (MESSAGE_BODY_MAX + 1)),
        ("body", ""),
        ("client_msg_id", "has space"),
        ("client_msg_id", "x" * 65),
        ("kind", "video"),
    ],
)
def test_message_limits_are_enforced_on_decode(field: str, value: str) -> None:
    """A payload breaking a field limit does not decode."""
    payload = {
        "type": "chat.message.sent",
        "conversation_id": str(ROOM),
        "message_id": str(uuid.uuid4()),
        "sender_id": str(ALICE),
        "client_msg_id": "ok",
        "body": "hello",
        field: value,
    }
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(payload, MessageSent)


def test_username_limits_are_enforced_on_decode() -> None:
    base = {"type": "chat.user.registered", "user_id": str(ALICE), "email": "a@b.c"}
    for bad in ("ab", "x" * (USERNAME_MAX + 1), "-leading", "white space"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({**base, "username": bad}, UserRegistered)
    assert msgspec.convert({**base, "username": "a.b-c_1"}, UserRegistered).username == "a.b-c_1"


def test_an_erased_personal_field_decodes_to_the_marker() -> None:
    """The explicit erased value is part of each personal field's type."""
    payload = {
        "type": "chat.user.registered",
        "user_id": str(ALICE),
        "username": {"kind": "erased"},
        "email": {"kind": "erased"},
    }
    event = msgspec.convert(payload, UserRegistered)
    assert event.username == ERASED
    assert event.email == ERASED


@pytest.mark.parametrize("name", ["", "a", "5b1e-…:client-42", "x" * 300])
def test_name_based_ids_are_the_standard_uuid5(name: str) -> None:
    namespace = uuid.uuid4()
    made = name_based_id(namespace, name)
    assert type(made) is uuid.UUID
    assert made == uuid.uuid5(namespace, name)
