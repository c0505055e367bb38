"""One valid instance of every event type, for tests that must cover the whole catalog."""

from __future__ import annotations

import uuid

from schemas import (
    ConversationCreated,
    DirectConversationOpened,
    Event,
    InitialMember,
    MediaUploaded,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageDeleted,
    MessageEdited,
    MessageSent,
    PasswordChanged,
    ReactionAdded,
    ReactionRemoved,
    ReadMarkerMoved,
    SessionRevoked,
    SessionStarted,
    UserErased,
    UserProfileUpdated,
    UserRegistered,
)

ALICE = uuid.UUID("0190a1b2-0000-7000-8000-00000000a11c")
BOB = uuid.UUID("0190a1b2-0000-7000-8000-000000000b0b")
ROOM = uuid.UUID("0190a1b2-0000-7000-8000-0000000000c1")
MESSAGE = uuid.UUID("0190a1b2-0000-7000-8000-0000000000e1")
SESSION = uuid.UUID("0190a1b2-0000-7000-8000-0000000000f1")
MEDIA = uuid.UUID("0190a1b2-0000-7000-8000-0000000000d1")


def sample_events(user: uuid.UUID = ALICE, room: uuid.UUID = ROOM) -> list[Event]:
    """Every event type once, with every personal field filled."""
    return [
        UserRegistered(
            user_id=user, username="alice", email="alice@example.org", display_name="Alice A."
        ),
        UserProfileUpdated(
            user_id=user, display_name="Alice", status="on holiday", settings={"theme": "dark"}
        ),
        PasswordChanged(user_id=user),
        SessionStarted(user_id=user, session_id=SESSION, expires_at=1_800_000_000, device="phone"),
        SessionRevoked(user_id=user, session_id=SESSION, reason="logout"),
        MediaUploaded(
            media_id=MEDIA,
            uploader_id=user,
            content_type="image/png",
            size=1024,
            sha256="ab" * 32,
            filename="holiday.png",
        ),
        ConversationCreated(
            conversation_id=room,
            creator_id=user,
            name="Hiking club",
            description="Weekends",
            members=(InitialMember(user, "owner"), InitialMember(BOB, "member")),
        ),
        DirectConversationOpened(conversation_id=room, user_ids=(user, BOB), opened_by=user),
        MemberJoined(conversation_id=room, user_id=BOB, role="member", added_by=user),
        MemberRoleChanged(conversation_id=room, user_id=BOB, role="admin", changed_by=user),
        MessageSent(
            conversation_id=room,
            message_id=MESSAGE,
            sender_id=user,
            client_msg_id="c-1",
            body="meet at 9 at the north trailhead",
        ),
        MessageEdited(
            conversation_id=room,
            message_id=MESSAGE,
            editor_id=user,
            body="meet at 10 at the north trailhead",
        ),
        ReactionAdded(conversation_id=room, message_id=MESSAGE, user_id=BOB, emoji="👍"),
        ReactionRemoved(conversation_id=room, message_id=MESSAGE, user_id=BOB, emoji="👍"),
        ReadMarkerMoved(conversation_id=room, user_id=BOB, up_to=MESSAGE),
        MessageDeleted(conversation_id=room, message_id=MESSAGE, deleted_by=user),
        MemberLeft(conversation_id=room, user_id=BOB, removed_by=BOB),
        UserErased(user_id=user),
    ]


PERSONAL_PLAINTEXTS = (
    "alice@example.org",
    "Alice A.",
    "on holiday",
    "holiday.png",
    "Hiking club",
    "Weekends",
    "north trailhead",
)
"""Substrings of personal values in :func:`sample_events` that must never appear in clear."""
