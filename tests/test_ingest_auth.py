"""Authentication over HTTP, and the error contract (problem+json), on the real stack."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import jwt
from redis.asyncio import Redis

from tests.system_fixtures import Api, System

PROBLEM = "urn:backbone:problem:"


async def test_register_validation_and_uniqueness(system: System) -> None:
    api = system.api
    name = f"Carol{uuid.uuid4().hex[:8]}"
    ok = await api.call(
        "POST",
        "/v1/auth/register",
        json={"username": name, "email": f"{name}@Example.test", "password": "a long passphrase"},
    )
    assert ok.status == 201
    for body, status, slug in (
        # Taken, case-insensitively, by username or by email.
        (
            {"username": name.lower(), "email": "x@y.test", "password": "another passphrase"},
            409,
            "taken",
        ),
        (
            {
                "username": "fresh" + name,
                "email": f"{name.upper()}@example.TEST",
                "password": "another passphrase",
            },
            409,
            "taken",
        ),
        # Weak passwords: too short, common, equal to the username.
        (
            {"username": "w1" + name, "email": "w1@y.test", "password": "short"},
            422,
            "weak-password",
        ),
        (
            {"username": "w2" + name, "email": "w2@y.test", "password": "password123"},
            422,
            "weak-password",
        ),
        (
            {"username": "w3" + name, "email": "w3@y.test", "password": "w3" + name},
            422,
            "weak-password",
        ),
        # Schema: a bad username, an unknown field, a missing field.
        (
            {"username": "no spaces", "email": "a@b.test", "password": "a long passphrase"},
            422,
            "invalid-body",
        ),
        (
            {
                "username": "ok" + name,
                "email": "a@b.test",
                "password": "a long passphrase",
                "admin": True,
            },
            422,
            "invalid-body",
        ),
        ({"username": "ok" + name}, 422, "invalid-body"),
    ):
        reply = await api.call("POST", "/v1/auth/register", json=body)
        assert reply.status == status, (body, reply.body)
        assert reply.body["type"] == PROBLEM + slug
        assert reply.headers["Content-Type"].startswith("application/problem+json")
        assert reply.body["status"] == status
        assert reply.body["title"]
        assert reply.body["request_id"] == reply.headers["X-Request-Id"]
    # Nothing of the refused registrations exists: each login fails.
    for login in ("w1" + name, "ok" + name):
        reply = await api.call(
            "POST", "/v1/auth/login", json={"login": login, "password": "a long passphrase"}
        )
        assert reply.status == 401


async def test_malformed_oversized_and_unknown_requests(system: System) -> None:
    api = system.api
    alice = await api.user()
    bad_json = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        data=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert (bad_json.status, bad_json.body["type"]) == (400, PROBLEM + "malformed-json")
    huge = b'{"name": "' + b"x" * (system.config.max_body + 10) + b'"}'
    too_big = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        data=huge,
        headers={"Content-Type": "application/json"},
    )
    assert (too_big.status, too_big.body["type"]) == (413, PROBLEM + "body-too-large")
    form = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        data=b"name=x",
        headers={"Content-Type": "text/plain"},
    )
    assert form.status == 415
    nowhere = await api.call("GET", "/v1/nowhere", token=alice.access)
    assert (nowhere.status, nowhere.body["type"]) == (404, PROBLEM + "not-found")
    wrong_verb = await api.call("PUT", "/v1/conversations", token=alice.access)
    assert wrong_verb.status == 405
    not_a_uuid = await api.call("GET", "/v1/conversations/not-a-uuid", token=alice.access)
    assert not_a_uuid.status == 404
    over_limit = await api.call(
        "POST", "/v1/conversations", token=alice.access, json={"name": "x" * 129}
    )
    assert over_limit.status == 422
    # None of it left anything behind.
    listing = await api.call("GET", "/v1/conversations", token=alice.access)
    assert listing.body["items"] == []
    assert b"Traceback" not in json.dumps(bad_json.body).encode()


async def test_login_failures_do_not_enumerate_accounts(system: System) -> None:
    api = system.api
    alice = await api.user()
    wrong = await api.call(
        "POST", "/v1/auth/login", json={"login": alice.username, "password": "wrong password!"}
    )
    unknown = await api.call(
        "POST",
        "/v1/auth/login",
        json={"login": "nobody" + alice.username, "password": "wrong password!"},
    )
    assert wrong.status == unknown.status == 401
    assert wrong.body["type"] == unknown.body["type"] == PROBLEM + "invalid-credentials"
    assert wrong.body.get("detail") == unknown.body.get("detail")
    by_email = await api.call(
        "POST",
        "/v1/auth/login",
        json={"login": f"{alice.username.upper()}@EXAMPLE.test", "password": alice.password},
    )
    assert by_email.status == 200


async def test_refresh_rotates_and_reuse_revokes_the_session(system: System) -> None:
    api = system.api
    alice = await api.user()
    first = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh})
    assert first.status == 200
    assert first.body["refresh_token"] != alice.refresh
    assert (await api.call("GET", "/v1/users/me", token=first.body["access_token"])).status in (
        200,
        404,
    )
    # The spent token again, moments later (a retry): its successor, not a new family.
    retry = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh})
    assert retry.status == 200
    assert retry.body["refresh_token"] == first.body["refresh_token"]
    # The chain goes on; now the first token coming back is reuse, even within the reuse
    # interval (its successor was spent): the whole session (family) is revoked.
    second = await api.call(
        "POST", "/v1/auth/refresh", json={"refresh_token": first.body["refresh_token"]}
    )
    assert second.status == 200
    reuse = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh})
    assert (reuse.status, reuse.body["type"]) == (401, PROBLEM + "refresh-reuse")
    for token in (alice.access, first.body["access_token"], second.body["access_token"]):
        assert (await api.call("GET", "/v1/conversations", token=token)).status == 401
    after = await api.call(
        "POST", "/v1/auth/refresh", json={"refresh_token": second.body["refresh_token"]}
    )
    assert after.status == 401
    garbage = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": "x" * 43})
    assert garbage.status == 401


async def test_logout_kills_the_token_at_once_even_without_redis_cache(system: System) -> None:
    api = system.api
    alice = await api.user()
    assert (await api.call("GET", "/v1/conversations", token=alice.access)).status == 200
    out = await api.call("POST", "/v1/auth/logout", token=alice.access)
    assert out.status == 204
    assert (await api.call("GET", "/v1/conversations", token=alice.access)).status == 401
    # Losing Redis's session cache must not resurrect it: PostgreSQL holds the revocation.
    keys = [
        k async for k in system.redis.scan_iter(match=f"{system.settings.topic_prefix}:session:*")
    ]
    assert keys
    await system.redis.delete(*keys)
    assert (await api.call("GET", "/v1/conversations", token=alice.access)).status == 401
    assert (
        await api.call("POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh})
    ).status == 401


async def test_forged_tokens_are_refused(system: System) -> None:
    api = system.api
    alice = await api.user()
    header, payload, _ = alice.access.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    now = int(time.time())

    def b64(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    forged = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 't1'})}.{payload}.",
        "other key": jwt.encode(claims, b"k" * 32, algorithm="HS256", headers={"kid": "t1"}),
        "unknown kid": jwt.encode(claims, b"k" * 32, algorithm="HS256", headers={"kid": "zz"}),
        "expired": alice.access.replace(payload, b64({**claims, "exp": now - 3600})),
        "tampered sub": ".".join(
            (header, b64({**claims, "sub": str(uuid.uuid4())}), alice.access.split(".")[2])
        ),
        "refresh as access": alice.refresh,
        "garbage": "a.b.c",
    }
    accepted = 0
    for name, token in forged.items():
        reply = await api.call("GET", "/v1/conversations", token=token)
        assert reply.status == 401, name
        assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer")
        accepted += reply.status < 400
    assert accepted == 0
    assert (await api.call("GET", "/v1/conversations")).status == 401
    basic = await api.call(
        "GET", "/v1/conversations", headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert basic.status == 401


async def assert_creates_and_reads_only(api: Api, key: dict[str, str]) -> None:
    """``key`` (scopes ``read`` and ``conversations:write``) creates a conversation and reads,
    but cannot send into it nor manage the account (sessions, keys, password)."""
    conv = await api.call("POST", "/v1/conversations", headers=key, json={"name": "by bot"})
    assert conv.status == 201
    cid = conv.body["conversation_id"]
    send = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        headers=key,
        json={"client_msg_id": "k1", "content": "hi"},
    )
    assert (send.status, send.body["type"]) == (403, PROBLEM + "insufficient-scope")
    account = await api.call(
        "POST", "/v1/api-keys", headers=key, json={"name": "x", "scopes": ["read"]}
    )
    assert account.status == 403, "a key never has the sessions pseudo-scope"
    assert (await api.call("GET", "/v1/conversations", headers=key)).status == 200


async def test_api_keys_are_scoped_and_revocable(system: System) -> None:
    api = system.api
    alice = await api.user()
    created = await api.call(
        "POST",
        "/v1/api-keys",
        token=alice.access,
        json={"name": "bot", "scopes": ["read", "conversations:write"]},
    )
    assert created.status == 201, created.body
    key = {"X-API-Key": created.body["api_key"]}
    await assert_creates_and_reads_only(api, key)
    revoked = await api.call("DELETE", f"/v1/api-keys/{created.body['key_id']}", token=alice.access)
    assert revoked.status == 204
    assert (await api.call("GET", "/v1/conversations", headers=key)).status == 401
    assert (
        await api.call("GET", "/v1/conversations", headers={"X-API-Key": "bbk_nope"})
    ).status == 401


async def test_password_change_ends_every_session(system: System) -> None:
    api = system.api
    alice = await api.user()
    second = await api.call(
        "POST", "/v1/auth/login", json={"login": alice.username, "password": alice.password}
    )
    wrong = await api.call(
        "POST",
        "/v1/users/me/password",
        token=alice.access,
        json={"current_password": "not it at all", "new_password": "brand new passphrase"},
    )
    assert wrong.status == 401
    changed = await api.call(
        "POST",
        "/v1/users/me/password",
        token=alice.access,
        json={"current_password": alice.password, "new_password": "brand new passphrase"},
    )
    assert changed.status == 202, changed.body
    for token in (alice.access, second.body["access_token"]):
        assert (await api.call("GET", "/v1/conversations", token=token)).status == 401
    old = await api.call(
        "POST", "/v1/auth/login", json={"login": alice.username, "password": alice.password}
    )
    assert old.status == 401
    new = await api.call(
        "POST", "/v1/auth/login", json={"login": alice.username, "password": "brand new passphrase"}
    )
    assert new.status == 200


async def test_revocations_are_published_for_the_fanout_tier(system: System) -> None:
    api = system.api
    alice = await api.user()
    listener = Redis.from_url(system.settings.redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(f"{system.settings.topic_prefix}:revocations")
    try:
        assert (await api.call("POST", "/v1/auth/logout", token=alice.access)).status == 204
        message = None
        async with asyncio.timeout(5):
            while message is None or message["type"] != "message":
                message = await pubsub.get_message(timeout=1.0)
        published = json.loads(message["data"])
        assert published["user_id"] == str(alice.user_id)
        assert published["reason"] == "logout"
    finally:
        await pubsub.aclose()
        await listener.aclose()
