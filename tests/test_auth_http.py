"""Auth over HTTP where it depends on more than one process: API keys verified from each
process's memory and revoked everywhere at once over the revocation feed, and refresh-token
rotation with its reuse interval. Two ingest apps share one deployment, like two workers."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from eventstore import Settings
from ingest.app import create_app
from ingest.auth.tokens import AccessTokens, new_jwt_key, parse_jwt_keys
from ingest.security import AUTH, AuthService
from tests.system_fixtures import Api, System, User, ingest_config, running_system
from tests.test_ingest_auth import assert_creates_and_reads_only

PROBLEM = "urn:backbone:problem:"


class Deployment(msgspec.Struct):
    system: System
    first: Api
    second: Api
    """Another ingest app (its own pool, Redis client, feed and cache) of the same deployment."""


def app_of(api: Api) -> web.Application:
    app: web.Application = api.client.server.app
    return app


def auth_of(api: Api) -> AuthService:
    return app_of(api)[AUTH]


class CountingPool:
    """Wraps a pool and counts every use."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.uses = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.pool, name)
        if name in ("fetchrow", "fetch", "fetchval", "execute", "acquire"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.uses += 1
                return attribute(*args, **kwargs)

            return counted
        return attribute


@pytest.fixture
async def deployment(base_settings: Settings) -> AsyncIterator[Deployment]:
    async with two_apps(base_settings) as running:
        yield running


class two_apps:  # noqa: N801 - used like a function
    def __init__(self, base: Settings, **config: Any) -> None:
        self.base = base
        self.config = config

    async def __aenter__(self) -> Deployment:
        keys = parse_jwt_keys(new_jwt_key("t1"))
        self._system = running_system(self.base, ingest_config(**self.config), keys)
        system = await self._system.__aenter__()
        app = create_app(system.settings, system.config, keys)
        self._client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await self._client.start_server()
        return Deployment(system, system.api, Api(self._client))

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._client.close()
        finally:
            await self._system.__aexit__(None, None, None)


async def api_key(api: Api, user: User, scopes: list[str]) -> tuple[str, dict[str, str]]:
    created = await api.call(
        "POST", "/v1/api-keys", token=user.access, json={"name": "bot", "scopes": scopes}
    )
    assert created.status == 201, created.body
    return created.body["key_id"], {"X-API-Key": created.body["api_key"]}


async def key_cached_by_both(deployment: Deployment) -> tuple[User, str, dict[str, str]]:
    """A user, and a ``read`` key of theirs that both processes have verified (and cached)."""
    alice = await deployment.first.user()
    key_id, key = await api_key(deployment.first, alice, ["read"])
    for api in (deployment.first, deployment.second, deployment.first, deployment.second):
        assert (await api.call("GET", "/v1/conversations", headers=key)).status == 200
    return alice, key_id, key


def count_lookups(api: Api, monkeypatch: pytest.MonkeyPatch) -> CountingPool:
    """Count every PostgreSQL use of the app's API-key verification from now on."""
    keys = auth_of(api).api_keys
    counting = CountingPool(keys._pool)
    monkeypatch.setattr(keys, "_pool", counting)
    return counting


async def test_both_processes_hear_the_revocation_feed(deployment: Deployment) -> None:
    for api in (deployment.first, deployment.second):
        auth = auth_of(api)
        assert auth.feed.live.is_set()
        assert auth.api_keys.caching


async def test_a_busy_key_is_verified_without_postgresql(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = deployment.second
    alice = await deployment.first.user()
    key_id, key = await api_key(deployment.first, alice, ["read"])
    lookups = count_lookups(api, monkeypatch)
    assert (await api.call("GET", "/v1/conversations", headers=key)).status == 200
    assert lookups.uses >= 1, "the first use looks the key up"
    lookups.uses = 0
    for _ in range(20):
        assert (await api.call("GET", "/v1/conversations", headers=key)).status == 200
    assert lookups.uses == 0, "the hot path did not touch PostgreSQL"
    # The database changed behind everyone's back (no feed message): the process still answers
    # from memory, which proves it did not ask. (Revocation through the API is announced.)
    await deployment.system.store.pool.execute(
        "UPDATE ingest.api_keys SET revoked_at = now() WHERE key_id = $1", key_id
    )
    assert (await api.call("GET", "/v1/conversations", headers=key)).status == 200


async def test_revoking_a_key_through_the_api_ends_it_in_every_process_at_once(
    deployment: Deployment,
) -> None:
    first, second = deployment.first, deployment.second
    alice, key_id, key = await key_cached_by_both(deployment)
    assert auth_of(second).api_keys._by_key.get(key_id) is not None, "cached in the other one"
    revoked = await first.call("DELETE", f"/v1/api-keys/{key_id}", token=alice.access)
    assert revoked.status == 204
    for api in (second, first):
        refused = await api.call("GET", "/v1/conversations", headers=key)
        assert refused.status == 401
        assert refused.body["type"] == PROBLEM + "invalid-token"


async def test_a_cached_key_still_honours_its_scopes(deployment: Deployment) -> None:
    api = deployment.second
    alice = await deployment.first.user()
    key_id, key = await api_key(deployment.first, alice, ["read", "conversations:write"])
    await assert_creates_and_reads_only(api, key)
    assert auth_of(api).api_keys._by_key.get(key_id) is not None, "answered from the cache"


async def test_erasing_the_owner_ends_their_cached_keys_everywhere(
    deployment: Deployment,
) -> None:
    first, second = deployment.first, deployment.second
    alice, _, key = await key_cached_by_both(deployment)
    erased = await first.call("DELETE", "/v1/users/me", token=alice.access)
    assert erased.status == 202, erased.body
    for api in (second, first):
        assert (await api.call("GET", "/v1/conversations", headers=key)).status == 401


def session_of(access_token: str) -> uuid.UUID:
    payload = access_token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return uuid.UUID(claims["sid"])


async def live_refresh_tokens(system: System, session_id: uuid.UUID) -> int:
    count: int = await system.store.pool.fetchval(
        "SELECT count(*) FROM ingest.refresh_tokens WHERE session_id = $1 AND spent_at IS NULL",
        session_id,
    )
    return count


async def test_a_concurrent_double_refresh_succeeds_twice_and_keeps_one_family(
    deployment: Deployment,
) -> None:
    """Two tabs (here: two processes) refresh with the same token at the same moment."""
    first, second = deployment.first, deployment.second
    alice = await first.user()
    body = {"refresh_token": alice.refresh}
    answers = await asyncio.gather(
        first.call("POST", "/v1/auth/refresh", json=body),
        second.call("POST", "/v1/auth/refresh", json=body),
    )
    assert [a.status for a in answers] == [200, 200], [a.body for a in answers]
    successors = {a.body["refresh_token"] for a in answers}
    assert len(successors) == 1, "both callers hold the one successor"
    assert alice.refresh not in successors
    session_id = session_of(alice.access)
    assert await live_refresh_tokens(deployment.system, session_id) == 1
    for answer in answers:
        assert session_of(answer.body["access_token"]) == session_id
        listing = await first.call("GET", "/v1/conversations", token=answer.body["access_token"])
        assert listing.status == 200
    # Either caller goes on as usual: the successor rotates once more.
    (successor,) = successors
    onward = await second.call("POST", "/v1/auth/refresh", json={"refresh_token": successor})
    assert onward.status == 200
    assert await live_refresh_tokens(deployment.system, session_id) == 1


async def test_reuse_after_the_interval_still_revokes_the_family(base_settings: Settings) -> None:
    async with two_apps(base_settings, refresh_reuse_interval=0.3) as running:
        api = running.first
        alice = await api.user()
        rotated = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh})
        assert rotated.status == 200
        await asyncio.sleep(0.5)
        reuse = await running.second.call(
            "POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh}
        )
        assert (reuse.status, reuse.body["type"]) == (401, PROBLEM + "refresh-reuse")
        for token in (alice.access, rotated.body["access_token"]):
            assert (await api.call("GET", "/v1/conversations", token=token)).status == 401
        after = await api.call(
            "POST", "/v1/auth/refresh", json={"refresh_token": rotated.body["refresh_token"]}
        )
        assert after.status == 401


def expired_access(api: Api, user: User) -> str:
    """An access token of ``user``'s session, signed by the app's own keys, expired an hour ago."""
    live = auth_of(api).tokens
    past = AccessTokens(
        live.keys,
        issuer=live.issuer,
        audience=live.audience,
        ttl=60,
        clock=lambda: time.time() - 3600,
        memo=False,
    )
    return past.issue(user.user_id, session_of(user.access))


async def test_an_authenticated_route_still_refuses_an_expired_access_token(
    system: System,
) -> None:
    api = system.api
    alice = await api.user()
    expired = expired_access(api, alice)
    assert (await api.call("GET", "/v1/conversations", token=alice.access)).status == 200
    for method, path in (("GET", "/v1/conversations"), ("POST", "/v1/auth/logout")):
        refused = await api.call(method, path, token=expired)
        assert (refused.status, refused.body["type"]) == (401, PROBLEM + "invalid-token"), path
        assert refused.headers.get("WWW-Authenticate", "").startswith("Bearer")
    garbage = await api.call("GET", "/v1/conversations", token="a.b.c")
    assert (garbage.status, garbage.body["type"]) == (401, PROBLEM + "invalid-token")


async def test_refresh_works_while_the_client_still_sends_its_expired_access_token(
    system: System,
) -> None:
    """Refresh is exactly when a client's access token has run out: the stale bearer it still
    attaches must not stand between it and a new pair."""
    api = system.api
    alice = await api.user()
    expired = expired_access(api, alice)
    refreshed = await api.call(
        "POST", "/v1/auth/refresh", token=expired, json={"refresh_token": alice.refresh}
    )
    assert refreshed.status == 200, refreshed.body
    assert refreshed.body["refresh_token"] != alice.refresh
    assert session_of(refreshed.body["access_token"]) == session_of(alice.access)
    fresh = refreshed.body["access_token"]
    assert (await api.call("GET", "/v1/conversations", token=fresh)).status == 200
    # A garbage bearer or a malformed header is ignored the same way; the refresh token alone
    # decides (here: the successor, spent normally).
    again = await api.call(
        "POST",
        "/v1/auth/refresh",
        headers={"Authorization": "Basic Zm9vOmJhcg=="},
        json={"refresh_token": refreshed.body["refresh_token"]},
    )
    assert again.status == 200, again.body
    # And a bad refresh token is still refused, whatever bearer comes with it.
    bad = await api.call("POST", "/v1/auth/refresh", token=fresh, json={"refresh_token": "x" * 43})
    assert (bad.status, bad.body["type"]) == (401, PROBLEM + "invalid-token")


async def test_login_and_register_ignore_a_stale_or_garbage_credential(system: System) -> None:
    api = system.api
    alice = await api.user()
    expired = expired_access(api, alice)
    login = {"login": alice.username, "password": alice.password}
    stale: list[dict[str, str]] = [
        {"Authorization": f"Bearer {expired}"},
        {"Authorization": "Bearer a.b.c"},
        {"Authorization": "Bearer"},
        {"X-API-Key": "bk_not_a_key"},
    ]
    for headers in stale:
        reply = await api.call("POST", "/v1/auth/login", headers=headers, json=login)
        assert reply.status == 200, (headers, reply.body)
        assert (
            await api.call("GET", "/v1/conversations", token=reply.body["access_token"])
        ).status == 200
        name = f"u{uuid.uuid4().hex[:12]}"
        registered = await api.call(
            "POST",
            "/v1/auth/register",
            headers=headers,
            json={
                "username": name,
                "email": f"{name}@example.test",
                "password": "correct horse battery",
            },
        )
        assert registered.status == 201, (headers, registered.body)
    # Wrong credentials still answer as before, a stale bearer or not.
    wrong = await api.call(
        "POST",
        "/v1/auth/login",
        token=expired,
        json={"login": alice.username, "password": "not the password"},
    )
    assert (wrong.status, wrong.body["type"]) == (401, PROBLEM + "invalid-credentials")
    health = await api.call("GET", "/healthz", token="a.b.c")
    assert health.status == 200
