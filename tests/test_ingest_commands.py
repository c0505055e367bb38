"""Conversation, member and message commands over HTTP, with their reads, on the real stack."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from eventstore import Position, Settings
from ingest.app import KEYS, create_app
from ingest.commands import sent_key
from projectors.read.contract import members_key
from tests.system_fixtures import Api, Reply, System, User, running_system
from tests.test_projector_support import log_end, wait_for


async def group(api: Api, owner: User, *members: User, name: str = "room") -> str:
    reply = await api.call(
        "POST",
        "/v1/conversations",
        token=owner.access,
        json={"name": name, "members": [str(m.user_id) for m in members]},
    )
    assert reply.status == 201, reply.body
    return str(reply.body["conversation_id"])


async def send(
    api: Api, user: User, cid: str, content: str, client_id: str | None = None, **extra: Any
) -> Reply:
    return await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=user.access,
        json={"client_msg_id": client_id or uuid.uuid4().hex, "content": content, **extra},
    )


async def messages(
    api: Api, user: User, cid: str, after: str | None = None, query: str = ""
) -> Reply:
    wait = f"min_position={after}&" if after else ""
    return await api.call(
        "GET", f"/v1/conversations/{cid}/messages?{wait}{query}", token=user.access
    )


async def test_members_read_and_post_and_non_members_get_404(system: System) -> None:
    api = system.api
    alice, bob, eve = await api.user(), await api.user(), await api.user()
    cid = await group(api, alice, bob)
    sent = await send(api, bob, cid, "hi from bob")
    assert sent.status == 202, sent.body
    page = await messages(api, alice, cid, sent.body["position"])
    assert page.status == 200
    (item,) = page.body["items"]
    assert item["content"] == "hi from bob"
    assert item["sender_id"] == str(bob.user_id)
    assert item["message_id"] == sent.body["message_id"]
    assert item["position"] == sent.body["position"]

    # Eve is no member: every read and command on the conversation is a 404 (no leak).
    for method, path, body in (
        ("GET", f"/v1/conversations/{cid}", None),
        ("GET", f"/v1/conversations/{cid}/members", None),
        ("GET", f"/v1/conversations/{cid}/messages", None),
        ("POST", f"/v1/conversations/{cid}/messages", {"client_msg_id": "x", "content": "no"}),
        ("POST", f"/v1/conversations/{cid}/read", {"up_to": item["message_id"]}),
    ):
        reply = await api.call(method, path, token=eve.access, json=body)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.body["type"] == "urn:backbone:problem:not-found"
    # The same answer as for a conversation that does not exist at all.
    ghost = await api.call("GET", f"/v1/conversations/{uuid.uuid4()}", token=eve.access)
    assert ghost.status == 404


async def test_conversation_list_details_members_and_unread_counts(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    cid = await group(api, alice, bob, name="team")
    first = await send(api, alice, cid, "one")
    last = await send(api, alice, cid, "two")
    assert first.status == last.status == 202
    listing = await api.call(
        "GET", f"/v1/conversations?min_position={last.body['position']}", token=bob.access
    )
    assert listing.status == 200, listing.body
    (conv,) = listing.body["items"]
    assert conv["conversation_id"] == cid
    assert conv["kind"] == "group"
    assert conv["name"] == "team"
    assert conv["role"] == "member"
    assert conv["unread_count"] == 2
    assert conv["last_message"]["content"] == "two"
    # The sender has read what they wrote.
    mine = await api.call("GET", "/v1/conversations", token=alice.access)
    assert mine.body["items"][0]["unread_count"] == 0
    assert mine.body["items"][0]["role"] == "owner"

    marker = await api.call(
        "POST",
        f"/v1/conversations/{cid}/read",
        token=bob.access,
        json={"up_to": first.body["message_id"]},
    )
    assert marker.status == 202
    details = await api.call(
        "GET", f"/v1/conversations/{cid}?min_position={marker.body['position']}", token=bob.access
    )
    assert details.status == 200
    assert details.body["unread_count"] == 1
    members = await api.call("GET", f"/v1/conversations/{cid}/members", token=bob.access)
    roles = {m["user_id"]: m["role"] for m in members.body["items"]}
    assert roles == {str(alice.user_id): "owner", str(bob.user_id): "member"}


async def test_message_pages_by_position(system: System) -> None:
    api = system.api
    alice = await api.user()
    cid = await group(api, alice)
    reply = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages:batch",
        token=alice.access,
        json={"messages": [{"client_msg_id": f"b{i}", "content": f"m{i}"} for i in range(7)]},
    )
    assert reply.status == 202, reply.body
    positions = [i["position"] for i in reply.body["items"]]
    assert [Position.parse(p).offset for p in positions] == sorted(
        Position.parse(p).offset for p in positions
    )
    latest = await messages(api, alice, cid, positions[-1], "limit=3")
    assert [m["content"] for m in latest.body["items"]] == ["m4", "m5", "m6"]
    assert latest.body["next"] is None
    older = await messages(api, alice, cid, query=f"limit=3&before={latest.body['prev']}")
    assert [m["content"] for m in older.body["items"]] == ["m1", "m2", "m3"]
    oldest = await messages(api, alice, cid, query=f"limit=3&before={older.body['prev']}")
    assert [m["content"] for m in oldest.body["items"]] == ["m0"]
    assert oldest.body["prev"] is None
    newer = await messages(
        api, alice, cid, query=f"limit=10&after={oldest.body['items'][0]['position']}"
    )
    assert [m["content"] for m in newer.body["items"]] == [f"m{i}" for i in range(1, 7)]
    assert latest.body["position"] is not None
    bad = await messages(api, alice, cid, query="before=nonsense")
    assert bad.status == 400
    assert bad.body["type"] == "urn:backbone:problem:invalid-parameter"
    both = await messages(api, alice, cid, query=f"before={positions[0]}&after={positions[0]}")
    assert both.status == 400


async def test_client_msg_id_is_idempotent_also_across_a_restart(system: System) -> None:
    api = system.api
    alice = await api.user()
    cid = await group(api, alice)
    first = await send(api, alice, cid, "once", client_id="same-id")
    again = await send(api, alice, cid, "once", client_id="same-id")
    assert first.status == again.status == 202
    assert again.body == first.body
    # A second ingest app (a restarted process) over the same database answers the same.
    app = create_app(system.settings, system.config, system.api.client.app[KEYS])
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        third = await Api(client).call(
            "POST",
            f"/v1/conversations/{cid}/messages",
            token=alice.access,
            json={"client_msg_id": "same-id", "content": "once"},
        )
    assert third.status == 202
    assert third.body == first.body
    page = await messages(api, alice, cid, first.body["position"])
    assert [m["message_id"] for m in page.body["items"]] == [first.body["message_id"]]


REUSED = "urn:backbone:problem:client-msg-id-reused"


async def send_batch(api: Api, user: User, cid: str, *items: tuple[str, str]) -> Reply:
    return await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages:batch",
        token=user.access,
        json={"messages": [{"client_msg_id": c, "content": t} for c, t in items]},
    )


async def test_a_client_msg_id_reused_in_another_conversation_is_refused(system: System) -> None:
    """The id names one message of the sender: a send to another conversation with it is no
    retry (it had been answered 202 with the first message's id and position, and appended
    nothing, so the message was silently lost). It is refused (409) and changes nothing, on the
    single and the batch path and from a restarted process; the true retry still answers."""
    api = system.api
    alice = await api.user()
    room_a, room_b = await group(api, alice, name="a"), await group(api, alice, name="b")
    first = await send(api, alice, room_a, "to a", client_id="1")
    assert first.status == 202, first.body
    end = await log_end(system.store)

    for content in ("to b", "to a"):  # another conversation: refused, whatever the content
        reused = await send(api, alice, room_b, content, client_id="1")
        assert (reused.status, reused.body.get("type")) == (409, REUSED), reused.body
        assert "another conversation" in reused.body["detail"]
    batch = await send_batch(api, alice, room_b, ("fresh", "new"), ("1", "to b"))
    assert (batch.status, batch.body.get("type")) == (409, REUSED), batch.body
    app = create_app(system.settings, system.config, system.api.client.app[KEYS])
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        restarted = await send(Api(client), alice, room_b, "to b", client_id="1")
    assert (restarted.status, restarted.body.get("type")) == (409, REUSED), restarted.body
    assert await log_end(system.store) == end  # nothing appended, not even the batch's "fresh"

    again = await send(api, alice, room_a, "to a", client_id="1")
    assert (again.status, again.body) == (202, first.body)
    retried = await send_batch(api, alice, room_a, ("1", "to a"), ("2", "also to a"))
    assert retried.status == 202, retried.body
    assert retried.body["items"][0] == first.body
    page = await messages(api, alice, room_a, retried.body["items"][1]["position"])
    assert [m["content"] for m in page.body["items"]] == ["to a", "also to a"]
    marker = await send(api, alice, room_b, "only this", client_id="3")
    page = await messages(api, alice, room_b, marker.body["position"])
    assert [m["content"] for m in page.body["items"]] == ["only this"]


async def test_a_client_msg_id_reused_with_other_content_is_refused(system: System) -> None:
    """A retry repeats its request: the same id with other content (or type, reply_to,
    media_id) in the same conversation is another message, refused as an idempotency key reused
    with other parameters is, rather than answered as if it had been sent."""
    api = system.api
    alice = await api.user()
    cid = await group(api, alice)
    first = await send(api, alice, cid, "hello", client_id="k")
    assert first.status == 202, first.body
    end = await log_end(system.store)
    for content, extra in (
        ("hello!", {}),
        ("hello", {"reply_to": first.body["message_id"]}),
    ):
        changed = await send(api, alice, cid, content, client_id="k", **extra)
        assert (changed.status, changed.body.get("type")) == (409, REUSED), changed.body
        assert "different message" in changed.body["detail"]
    batch = await send_batch(api, alice, cid, ("k", "hello?"))
    assert (batch.status, batch.body.get("type")) == (409, REUSED), batch.body
    assert await log_end(system.store) == end
    again = await send(api, alice, cid, "hello", client_id="k")
    assert (again.status, again.body) == (202, first.body)
    page = await messages(api, alice, cid, first.body["position"])
    assert [m["content"] for m in page.body["items"]] == ["hello"]


async def _has(redis: Redis, key: str, part: bytes) -> bool:
    return part in (await redis.get(key) or b"")


async def test_a_send_remembered_in_the_old_format_is_told_apart_too(system: System) -> None:
    """Records written before the conversation and a digest were kept hold the position alone:
    the read model tells whether that message is in the conversation sent to."""
    api = system.api
    alice = await api.user()
    room_a, room_b = await group(api, alice, name="a"), await group(api, alice, name="b")
    first = await send(api, alice, room_a, "to a", client_id="old")
    assert first.status == 202, first.body
    key = sent_key(system.settings.topic_prefix, alice.user_id, "old")
    # The record is written behind the answer; this one is in the new format.
    await wait_for(lambda: _has(system.redis, key, b" "), 5, "the send's record")
    await system.redis.set(key, first.body["position"], ex=60)
    end = await log_end(system.store)
    reused = await send(api, alice, room_b, "to b", client_id="old")
    assert (reused.status, reused.body.get("type")) == (409, REUSED), reused.body
    assert await log_end(system.store) == end
    again = await send(api, alice, room_a, "to a", client_id="old")
    assert (again.status, again.body) == (202, first.body)
    assert await log_end(system.store) == end


async def test_edit_delete_react_with_permissions(system: System) -> None:
    api = system.api
    owner, admin, member, other = [await api.user() for _ in range(4)]
    cid = await group(api, owner, admin, member, other)
    promote = await api.call(
        "PATCH",
        f"/v1/conversations/{cid}/members/{admin.user_id}",
        token=owner.access,
        json={"role": "admin"},
    )
    assert promote.status == 202, promote.body
    sent = await send(api, member, cid, "original")
    mid = sent.body["message_id"]
    path = f"/v1/conversations/{cid}/messages/{mid}"

    assert (
        await api.call("PATCH", path, token=other.access, json={"content": "hijack"})
    ).status == 403
    edited = await api.call("PATCH", path, token=member.access, json={"content": "edited"})
    assert edited.status == 202
    react = await api.call("POST", path + "/reactions", token=other.access, json={"emoji": "👍"})
    assert react.status == 202
    react2 = await api.call("POST", path + "/reactions", token=owner.access, json={"emoji": "👍"})
    page = await messages(api, other, cid, react2.body["position"])
    (item,) = page.body["items"]
    assert item["content"] == "edited"
    assert item["edited_at"] is not None
    assert item["reactions"] == {"👍": {"count": 2, "me": True}}
    unreact = await api.call("DELETE", path + "/reactions/👍", token=other.access)
    assert unreact.status == 202
    page = await messages(api, other, cid, unreact.body["position"])
    assert page.body["items"][0]["reactions"] == {"👍": {"count": 1}}

    assert (await api.call("DELETE", path, token=other.access)).status == 403
    deleted = await api.call("DELETE", path, token=admin.access)
    assert deleted.status == 202, deleted.body
    page = await messages(api, member, cid, deleted.body["position"])
    (item,) = page.body["items"]
    assert item["deleted"] is True
    assert item["content"] is None
    again = await api.call("PATCH", path, token=member.access, json={"content": "zombie"})
    assert again.status == 409


async def test_membership_permission_matrix(system: System) -> None:
    api = system.api
    owner, admin, member, newcomer, late = [await api.user() for _ in range(5)]
    cid = await group(api, owner, admin, member)
    members = f"/v1/conversations/{cid}/members"

    async def status(user: User, method: str, path: str, body: Any = None) -> int:
        return (await api.call(method, path, token=user.access, json=body)).status

    assert await status(owner, "PATCH", f"{members}/{admin.user_id}", {"role": "admin"}) == 202
    # A member cannot add; an admin adds members but not admins; an owner adds admins.
    assert await status(member, "POST", members, {"user_id": str(newcomer.user_id)}) == 403
    assert (
        await status(admin, "POST", members, {"user_id": str(newcomer.user_id), "role": "admin"})
        == 403
    )
    assert await status(admin, "POST", members, {"user_id": str(newcomer.user_id)}) == 202
    assert await status(admin, "POST", members, {"user_id": str(uuid.uuid4())}) == 404
    # The newcomer can post at once: a refusal would only come after the model caught up.
    assert (await send(api, newcomer, cid, "I am in")).status == 202
    assert await status(owner, "POST", members, {"user_id": str(newcomer.user_id)}) == 409
    # Role changes: owner only, never their own, never another owner's.
    assert await status(admin, "PATCH", f"{members}/{member.user_id}", {"role": "admin"}) == 403
    assert await status(owner, "PATCH", f"{members}/{owner.user_id}", {"role": "member"}) == 409
    # Removal: an admin removes members, not admins or owners; an owner removes admins and
    # members, never another owner.
    assert await status(admin, "DELETE", f"{members}/{owner.user_id}") == 403
    assert await status(member, "DELETE", f"{members}/{newcomer.user_id}") == 403
    removal = await api.call("DELETE", f"{members}/{newcomer.user_id}", token=admin.access)
    assert removal.status == 202
    # Once the removal is projected (a positive check may be stale by the projection lag,
    # see docs/permissions.md): no more posting or reading (404, as for any non-member).
    caught_up = f"{members}?min_position={removal.body['position']}"
    assert await status(admin, "GET", caught_up) == 200
    assert (await send(api, newcomer, cid, "still here?")).status == 404
    assert await status(newcomer, "GET", f"/v1/conversations/{cid}") == 404
    # Leaving: anyone but the last owner.
    assert await status(owner, "DELETE", f"{members}/{owner.user_id}") == 409
    assert await status(member, "DELETE", f"{members}/{member.user_id}") == 202
    promotion = await api.call(
        "PATCH", f"{members}/{admin.user_id}", token=owner.access, json={"role": "owner"}
    )
    assert promotion.status == 202
    # Owners neither demote nor remove one another (removing and adding back would demote);
    # checked once the promotion is projected (a positive check may be stale until then).
    assert await status(owner, "GET", f"{members}?min_position={promotion.body['position']}") == 200
    assert await status(owner, "DELETE", f"{members}/{admin.user_id}") == 403
    assert await status(admin, "DELETE", f"{members}/{owner.user_id}") == 403
    assert await status(owner, "DELETE", f"{members}/{owner.user_id}") == 202
    assert await status(late, "POST", members, {"user_id": str(late.user_id)}) == 404


async def test_direct_conversations(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    one = await api.call(
        "POST", "/v1/conversations/direct", token=alice.access, json={"user_id": str(bob.user_id)}
    )
    assert one.status == 200, one.body
    sent = await send(api, bob, one.body["conversation_id"], "psst")
    assert sent.status == 202, sent.body
    two = await api.call(
        "POST", "/v1/conversations/direct", token=bob.access, json={"user_id": str(alice.user_id)}
    )
    assert two.body["conversation_id"] == one.body["conversation_id"]
    details = await api.call(
        "GET", f"/v1/conversations/{one.body['conversation_id']}", token=alice.access
    )
    assert details.body["kind"] == "direct"
    carol = await api.user()
    add = await api.call(
        "POST",
        f"/v1/conversations/{one.body['conversation_id']}/members",
        token=alice.access,
        json={"user_id": str(carol.user_id)},
    )
    assert add.status == 409
    self_dm = await api.call(
        "POST", "/v1/conversations/direct", token=alice.access, json={"user_id": str(alice.user_id)}
    )
    assert self_dm.status == 422
    nobody = await api.call(
        "POST", "/v1/conversations/direct", token=alice.access, json={"user_id": str(uuid.uuid4())}
    )
    assert nobody.status == 404


async def test_reply_to_must_exist_in_the_conversation(system: System) -> None:
    api = system.api
    alice = await api.user()
    cid = await group(api, alice)
    other = await group(api, alice)
    original = await send(api, alice, cid, "question")
    ok = await send(api, alice, cid, "answer", reply_to=original.body["message_id"])
    assert ok.status == 202
    elsewhere = await send(api, alice, other, "answer", reply_to=original.body["message_id"])
    assert elsewhere.status == 404
    media_without_id = await send(api, alice, cid, "pic", type="media")
    assert media_without_id.status == 422


async def test_profile_update_and_public_profile(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    patch = await api.call(
        "PATCH",
        "/v1/users/me",
        token=alice.access,
        json={"display_name": "Alice", "status": "away", "settings": {"theme": "dark"}},
    )
    assert patch.status == 202, patch.body
    me = await api.call(
        "GET", f"/v1/users/me?min_position={patch.body['position']}", token=alice.access
    )
    assert me.status == 200
    assert me.body["display_name"] == "Alice"
    assert me.body["settings"] == {"theme": "dark"}
    public = await api.call("GET", f"/v1/users/{alice.user_id}", token=bob.access)
    assert public.body["username"] == alice.username
    assert "settings" not in public.body
    assert (await api.call("PATCH", "/v1/users/me", token=alice.access, json={})).status == 422


async def test_a_role_refusal_waits_for_the_read_model(base_settings: Settings) -> None:
    """A promotion appended a moment ago is honoured although the read model lags it: a
    refusal on role stands only once the model has caught up; a real one still stands."""
    async with running_system(base_settings, projection_delay=0.3) as lagging:
        api = lagging.api
        owner, admin, member, newcomer, other = [await api.user() for _ in range(5)]
        cid = await group(api, owner, admin, member)
        members = f"/v1/conversations/{cid}/members"
        promoted = await api.call(
            "PATCH", f"{members}/{admin.user_id}", token=owner.access, json={"role": "admin"}
        )
        assert promoted.status == 202
        # At once, before the projector (held back 0.3 s) has applied the promotion.
        added = await api.call(
            "POST", members, token=admin.access, json={"user_id": str(newcomer.user_id)}
        )
        assert added.status == 202, added.body
        refused = await api.call(
            "POST", members, token=member.access, json={"user_id": str(other.user_id)}
        )
        assert refused.status == 403


async def test_adding_a_member_the_membership_cache_already_holds_is_a_conflict(
    system: System,
) -> None:
    """The projector writes its caches before it commits a batch: a member added a moment ago
    may be in the membership cache, and post through it, before PostgreSQL has their row.
    Adding them again then is refused as it is once the row is there, and appends nothing."""
    api = system.api
    owner, newcomer = await api.user(), await api.user()
    created = await api.call("POST", "/v1/conversations", token=owner.access, json={"name": "r"})
    assert created.status == 201, created.body
    cid, position = created.body["conversation_id"], created.body["position"]
    shown = await api.call(
        "GET", f"/v1/conversations/{cid}?min_position={position}", token=owner.access
    )
    assert shown.status == 200  # projected: the projector will not write this hash again
    # What the projector leaves between the cache write of the newcomer's join and its commit:
    await system.redis.hset(
        members_key(system.settings.topic_prefix, cid), str(newcomer.user_id), "member"
    )

    before = await log_end(system.store)
    again = await api.call(
        "POST",
        f"/v1/conversations/{cid}/members",
        token=owner.access,
        json={"user_id": str(newcomer.user_id)},
    )
    assert again.status == 409, again.body
    assert (again.body["type"], again.body["detail"]) == (
        "urn:backbone:problem:conflict",
        "already a member",
    )
    assert await log_end(system.store) == before


async def test_a_text_postgresql_cannot_hold_is_refused_and_appends_nothing(system: System) -> None:
    """A NUL character in any free text is bad input (422 ``invalid-body``): PostgreSQL cannot
    store one, so a login with one had answered 500, and a message with one was appended (202)
    and then stopped its partition's projector. A final newline after a pattern's characters is
    refused too (``"alice\\n"`` had been a username beside ``"alice"``)."""
    api = system.api
    alice = await api.user()
    cid = await group(api, alice)
    end = await log_end(system.store)
    refused = [
        await send(api, alice, cid, "a\x00b"),
        await api.call("POST", "/v1/auth/login", json={"login": "a\x00", "password": "x"}),
        await api.call(
            "POST",
            "/v1/auth/register",
            json={"username": "alice\n", "email": "a@example.test", "password": "long enough pw"},
        ),
        await api.call(
            "POST",
            "/v1/auth/register",
            json={"username": "bob", "email": "b\x00@example.test", "password": "long enough pw"},
        ),
        await api.call(
            "PATCH", "/v1/users/me", token=alice.access, json={"display_name": "Al\x00ice"}
        ),
    ]
    assert [(r.status, r.body["type"].rsplit(":", 1)[-1]) for r in refused] == [
        (422, "invalid-body")
    ] * len(refused)
    assert await log_end(system.store) == end, "nothing was appended"
    assert (await send(api, alice, cid, "a\nb\n")).status == 202, "newlines are text"
