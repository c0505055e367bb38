"""Each event's effect on the read model and its caches, through the real batch handler."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from prometheus_client import REGISTRY

from eventstore import create_pool, stream_placement
from eventstore.cloudevents import frame
from projectors.caches import RECENT_LIMIT, summary_key
from projectors.checksum import checksum
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA, members_key, recent_key, user_conversations_key
from projectors.schema import ensure_live_schema
from projectors.tables import COPY_FROM_ROWS
from schemas import (
    DirectConversationOpened,
    MediaUploaded,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageDeleted,
    MessageEdited,
    PasswordChanged,
    ReactionAdded,
    ReactionRemoved,
    ReadMarkerMoved,
    SessionRevoked,
    SessionStarted,
    UserErased,
    UserProfileUpdated,
)
from tests.store_fixtures import fresh_database
from tests.test_projector_support import (
    World,
    catch_up,
    group,
    message,
    register,
    world_fixture,  # noqa: F401 - provides the `world` fixture
)


async def test_user_profile_sessions_and_media_are_projected(world: World) -> None:
    alice, session, media = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    written = await world.write(
        [
            register(alice, "alice"),
            UserProfileUpdated(
                user_id=alice, display_name="Alice", status="away", settings={"theme": "dark"}
            ),
            UserProfileUpdated(user_id=alice, status="back"),
            PasswordChanged(user_id=alice),
            SessionStarted(user_id=alice, session_id=session, expires_at=1_900_000_000, device="x"),
            SessionRevoked(user_id=alice, session_id=session, reason="logout"),
            MediaUploaded(
                media_id=media,
                uploader_id=alice,
                content_type="image/png",
                size=10,
                sha256="ab" * 32,
                filename="a.png",
            ),
        ]
    )
    await world.catch_up()

    user = await world.row("SELECT * FROM chat.users WHERE user_id = $1", alice)
    assert user is not None
    assert (user["display_name"], user["status"], user["role"], user["erased"]) == (
        "Alice",
        "back",
        "user",
        False,
    )
    assert msgspec.json.decode(str(user["settings"])) == {"theme": "dark"}
    assert user["registered_at"] == written[0].envelope.time
    assert user["password_changed_at"] == written[3].envelope.time
    revoked = await world.row("SELECT * FROM chat.sessions WHERE session_id = $1", session)
    assert revoked is not None
    assert (revoked["device"], revoked["revoke_reason"]) == ("x", "logout")
    assert revoked["revoked_at"] == written[5].envelope.time
    stored = await world.row("SELECT * FROM chat.media WHERE media_id = $1", media)
    assert stored is not None
    assert (stored["uploader_id"], stored["size"], stored["filename"]) == (alice, 10, "a.png")


async def test_membership_join_leave_and_role_with_caches(world: World) -> None:
    owner, bob, carol, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write(
        [
            group(room, owner, bob, name="Hikers"),
            MemberJoined(conversation_id=room, user_id=carol, added_by=owner),
            MemberJoined(conversation_id=room, user_id=carol, added_by=owner),  # no-op
            MemberRoleChanged(conversation_id=room, user_id=bob, role="admin", changed_by=owner),
            MemberLeft(conversation_id=room, user_id=carol, removed_by=carol),
        ]
    )
    await world.catch_up()

    members = await world.rows(
        "SELECT user_id, role FROM chat.members WHERE conversation_id = $1 ORDER BY role", room
    )
    assert {(m["user_id"], m["role"]) for m in members} == {(owner, "owner"), (bob, "admin")}
    conversation = await world.row(
        "SELECT kind, name, member_count, creator_id FROM chat.conversations "
        "WHERE conversation_id = $1",
        room,
    )
    assert conversation == {
        "kind": "group",
        "name": "Hikers",
        "member_count": 2,
        "creator_id": owner,
    }
    cached = await world.redis.hgetall(members_key(world.namespace, room))
    assert cached == {str(owner).encode(): b"owner", str(bob).encode(): b"admin"}
    assert await world.redis.smembers(user_conversations_key(world.namespace, bob)) == {
        str(room).encode()
    }
    assert not await world.redis.exists(user_conversations_key(world.namespace, carol))
    summary = await world.redis.hgetall(summary_key(world.namespace, room))
    assert (summary[b"name"], summary[b"member_count"]) == (b"Hikers", b"2")


async def test_direct_conversation_has_both_users_and_no_name(world: World) -> None:
    a, b = sorted([uuid.uuid4(), uuid.uuid4()])
    room = uuid.uuid4()
    await world.write(
        [
            DirectConversationOpened(conversation_id=room, user_ids=(a, b), opened_by=b),
            DirectConversationOpened(conversation_id=room, user_ids=(a, b), opened_by=a),
        ]
    )
    await world.catch_up()

    conversation = await world.row(
        "SELECT kind, name, creator_id, member_count FROM chat.conversations "
        "WHERE conversation_id = $1",
        room,
    )
    assert conversation == {"kind": "direct", "name": None, "creator_id": b, "member_count": 2}
    members = await world.rows(
        "SELECT user_id, role FROM chat.members WHERE conversation_id = $1", room
    )
    assert {(m["user_id"], m["role"]) for m in members} == {(a, "member"), (b, "member")}


async def test_messages_edits_deletes_reactions_and_unread_counts(world: World) -> None:
    owner, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    written = await world.write(
        [
            group(room, owner, bob),
            message(room, owner, "one", first),
            message(room, owner, "two", second),
            message(room, bob, "three", third),
            message(room, bob, "duplicate id is ignored", third),
            MessageEdited(conversation_id=room, message_id=first, editor_id=owner, body="ONE"),
            MessageDeleted(conversation_id=room, message_id=second, deleted_by=owner),
            MessageEdited(conversation_id=room, message_id=second, editor_id=owner, body="back?"),
            ReactionAdded(conversation_id=room, message_id=first, user_id=bob, emoji="👍"),
            ReactionAdded(conversation_id=room, message_id=first, user_id=owner, emoji="👍"),
            ReactionAdded(conversation_id=room, message_id=first, user_id=bob, emoji="🎉"),
            ReactionRemoved(conversation_id=room, message_id=first, user_id=bob, emoji="🎉"),
            ReadMarkerMoved(conversation_id=room, user_id=bob, up_to=first),
        ]
    )
    await world.catch_up()

    rows = await world.rows(
        'SELECT message_id, seq, body, deleted, edited_at, "offset" FROM chat.messages '
        'WHERE conversation_id = $1 ORDER BY "offset"',
        room,
    )
    assert [(r["message_id"], r["seq"], r["body"], r["deleted"]) for r in rows] == [
        (first, 1, "ONE", False),
        (second, 2, None, True),
        (third, 3, "three", False),
    ]
    assert rows[0]["edited_at"] == written[5].envelope.time
    assert [r["offset"] for r in rows] == [w.position.offset for w in written[1:4]]
    reactions = await world.rows(
        "SELECT emoji, count(*) AS n FROM chat.reactions WHERE message_id = $1 GROUP BY emoji",
        first,
    )
    assert reactions == [{"emoji": "👍", "n": 2}]
    unread = await world.rows(
        "SELECT m.user_id, c.message_count - coalesce(r.up_to_seq, 0) AS unread "
        "FROM chat.members m JOIN chat.conversations c USING (conversation_id) "
        "LEFT JOIN chat.read_markers r USING (conversation_id, user_id) "
        "WHERE m.conversation_id = $1",
        room,
    )
    # bob sent #3 (his marker moved there; the later marker at #1 cannot move it back);
    # owner sent #1 and #2 and has not read #3.
    assert {(r["user_id"], r["unread"]) for r in unread} == {(bob, 0), (owner, 1)}
    conversation = await world.row(
        "SELECT message_count, last_message_id, last_offset FROM chat.conversations "
        "WHERE conversation_id = $1",
        room,
    )
    assert conversation == {
        "message_count": 3,
        "last_message_id": third,
        "last_offset": written[3].position.offset,
    }


async def test_joining_later_starts_with_nothing_unread(world: World) -> None:
    owner, late, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write(
        [
            group(room, owner),
            message(room, owner, "before"),
            MemberJoined(conversation_id=room, user_id=late, added_by=owner),
            message(room, owner, "after"),
        ]
    )
    await world.catch_up()

    marker = await world.row(
        "SELECT c.message_count - r.up_to_seq AS unread FROM chat.read_markers r "
        "JOIN chat.conversations c USING (conversation_id) WHERE r.user_id = $1",
        late,
    )
    assert marker == {"unread": 1}


async def test_recent_history_holds_the_last_frames_in_log_order(world: World) -> None:
    owner, room = uuid.uuid4(), uuid.uuid4()
    written = await world.write(
        [group(room, owner), *(message(room, owner, f"m{n}") for n in range(RECENT_LIMIT + 20))]
    )
    await world.catch_up()

    entries = await world.redis.zrange(recent_key(world.namespace, room), 0, -1, withscores=True)
    assert len(entries) == RECENT_LIMIT
    assert [raw for raw, _ in entries] == [frame(r) for r in written[-RECENT_LIMIT:]]
    assert [int(score) for _, score in entries] == [
        r.position.offset for r in written[-RECENT_LIMIT:]
    ]
    last = msgspec.json.decode(entries[-1][0])
    assert last["type"] == "event"
    assert last["position"] == written[-1].position.token()
    assert last["event"]["specversion"] == "1.0"
    assert last["event"]["type"] == "chat.message.sent"
    assert last["event"]["data"]["body"] == f"m{RECENT_LIMIT + 19}"


async def test_erasure_redacts_the_user_everywhere(world: World) -> None:
    """Profile, messages, group names, media names, session devices, recent history."""
    alice, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    media, session = uuid.uuid4(), uuid.uuid4()
    await world.write(
        [
            register(alice, "alice"),
            UserProfileUpdated(user_id=alice, display_name="Alice", status="secret status"),
            SessionStarted(user_id=alice, session_id=session, expires_at=1_900_000_000, device="d"),
            MediaUploaded(
                media_id=media,
                uploader_id=alice,
                content_type="image/png",
                size=1,
                sha256="cd" * 32,
                filename="secret.png",
            ),
            group(room, alice, bob, name="alice's secret club"),
            message(room, alice, "alice's secret"),
            message(room, bob, "bob's words"),
        ]
    )
    await world.catch_up()
    await world.store.keyring.erase(alice)
    await world.write([UserErased(user_id=alice)])
    await world.catch_up()

    user = await world.row(
        "SELECT username, display_name, status, settings, erased FROM chat.users "
        "WHERE user_id = $1",
        alice,
    )
    assert user == {
        "username": None,
        "display_name": None,
        "status": None,
        "settings": None,
        "erased": True,
    }
    bodies = await world.rows(
        "SELECT sender_id, body FROM chat.messages WHERE conversation_id = $1", room
    )
    assert {(b["sender_id"], b["body"]) for b in bodies} == {(alice, None), (bob, "bob's words")}
    assert await world.row(
        "SELECT name, description FROM chat.conversations WHERE conversation_id = $1", room
    ) == {"name": None, "description": None}
    assert await world.row("SELECT filename FROM chat.media WHERE media_id = $1", media) == {
        "filename": None
    }
    assert await world.row("SELECT device FROM chat.sessions WHERE session_id = $1", session) == {
        "device": None
    }
    recent = b"".join(await world.redis.zrange(recent_key(world.namespace, room), 0, -1))
    assert b"secret" not in recent
    assert b"bob's words" in recent
    assert b'{"kind":"erased"}' in recent
    summary = await world.redis.hgetall(summary_key(world.namespace, room))
    assert b"name" not in summary


async def test_a_replay_after_an_erasure_equals_the_live_redacted_model(world: World) -> None:
    """Live: plaintext projected, then redacted. Replay: the key is gone, values decode as
    erased. Both must end byte-identical."""
    alice, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write(
        [
            register(alice, "alice"),
            register(bob, "bob"),
            UserProfileUpdated(user_id=alice, display_name="A", status="s", settings={"k": 1}),
            group(room, alice, bob, name="club"),
            message(room, alice, "from alice"),
            message(room, bob, "from bob"),
        ]
    )
    await world.catch_up()
    await world.store.keyring.erase(alice)
    await world.write([UserErased(user_id=alice)])
    await world.catch_up()

    other = await fresh_database(world.settings)
    pool = await create_pool(other.postgres_dsn)
    try:
        await ensure_live_schema(pool)
        await catch_up(world.store, Projector(pool, world.store.layout))
        async with world.store.pool.acquire() as live, pool.acquire() as replay:
            assert await checksum(live, LIVE_SCHEMA) == await checksum(replay, LIVE_SCHEMA)
    finally:
        await pool.close()


def _assumed_keys_taken() -> float:
    return REGISTRY.get_sample_value("backbone_projector_assumed_keys_taken_total") or 0.0


@pytest.mark.parametrize("count", [COPY_FROM_ROWS + 20, 6], ids=["large", "small"])
async def test_a_batch_assumes_its_messages_new_and_a_taken_id_is_left_alone(
    world: World, count: int
) -> None:
    """A batch of ``MessageSent``, large or small, does not read their ids: it copies the rows
    and lets the primary key refuse a taken one. One id stored by an earlier batch (in another
    conversation) makes the batch start over reading every key: first wins, as always."""
    alice, room = uuid.uuid4(), uuid.uuid4()
    # Both rooms in one partition: "first" is then the log's order for every reader (across
    # partitions it is whichever a reader happens to apply first).
    partitions = world.store.layout.partitions("conversation")
    first_room = uuid.uuid4()
    while stream_placement(first_room, partitions)[1] != stream_placement(room, partitions)[1]:
        first_room = uuid.uuid4()
    taken = uuid.uuid4()
    await world.write(
        [
            register(alice, "alice"),
            group(first_room, alice),
            group(room, alice),
            message(first_room, alice, "the first", mid=taken),
        ]
    )
    await world.catch_up()
    before = _assumed_keys_taken()
    await world.write([message(room, alice, f"new {n}") for n in range(count)])
    await world.catch_up()
    assert _assumed_keys_taken() == before, "every id was new: the assumption held"

    again = [message(room, alice, f"more {n}") for n in range(count)]
    again[count // 2] = message(room, alice, "the second", mid=taken)
    await world.write(again)
    await world.catch_up()
    assert _assumed_keys_taken() == before + 1, "the taken id was found by the insert"

    kept = await world.row(
        "SELECT conversation_id, body FROM chat.messages WHERE message_id = $1", taken
    )
    assert kept == {"conversation_id": first_room, "body": "the first"}
    stored = await world.row(
        "SELECT message_count, (SELECT count(*) FROM chat.messages m "
        "WHERE m.conversation_id = c.conversation_id) AS rows "
        "FROM chat.conversations c WHERE conversation_id = $1",
        room,
    )
    assert stored == {"message_count": 2 * count - 1, "rows": 2 * count - 1}

    # The same log applied in other batches (of at most 100 records) gives the same model.
    other = await fresh_database(world.settings)
    pool = await create_pool(other.postgres_dsn)
    try:
        await ensure_live_schema(pool)
        await catch_up(world.store, Projector(pool, world.store.layout), max_records=100)
        async with world.store.pool.acquire() as live, pool.acquire() as small:
            assert await checksum(live, LIVE_SCHEMA) == await checksum(small, LIVE_SCHEMA)
    finally:
        await pool.close()
