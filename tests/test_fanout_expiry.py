"""Sockets and the lifetime of their access token: closed at expiry, refreshed in band.

Tokens with a short expiry are minted here with the deployment's signing key for a user's
live session (what ingest's login and refresh do, with another TTL); the node runs with no
clock-skew leeway so that the deadline is the token's ``exp`` itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt

from eventstore import Settings
from fanout.config import FanoutConfig
from fanout.connection import Connection
from fanout.node import FanoutNode
from ingest.auth.tokens import AccessTokens, parse_jwt_keys
from tests.system_fixtures import System, User
from tests.test_fanout_system import KEY, WITHIN, bodies, connect, deployment, group, send

SLACK = 5.0
"""Bound past a deadline for the close to arrive (the sweep runs every second)."""


def mint(user: User, ttl: int, *, age: int = 0) -> tuple[str, int]:
    """An access token of ``user``'s session living ``ttl`` seconds (issued ``age`` seconds
    ago), and its ``exp``."""
    config = FanoutConfig()
    tokens = AccessTokens(
        parse_jwt_keys(KEY),
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
        ttl=ttl,
        clock=lambda: time.time() - age,
    )
    token = tokens.issue(user.user_id, session_of(user.access))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    return token, int(exp)


def session_of(token: str) -> uuid.UUID:
    return uuid.UUID(jwt.decode(token, options={"verify_signature": False})["sid"])


async def applied(node: FanoutNode, condition: Callable[[Connection], bool]) -> None:
    """Wait (bounded) until a socket of ``node`` meets ``condition``: a later ``auth`` frame
    is checked asynchronously and has no answer when it is accepted."""
    hub = node.hub
    assert hub is not None
    async with asyncio.timeout(WITHIN):
        while not any(condition(conn) for conn in hub.connections):
            await asyncio.sleep(0.01)


def until(deadline: int) -> float:
    """Seconds from now to ``deadline``, plus the slack a close may take."""
    return max(0.0, deadline - time.time()) + SLACK


def errors(client: Any) -> list[str]:
    return [f["code"] for f in client.of_type("error")]


async def login(system: System, user: User) -> str:
    """Another session of ``user``: a fresh login's access token."""
    reply = await system.api.call(
        "POST", "/v1/auth/login", json={"login": user.username, "password": user.password}
    )
    assert reply.status == 200, reply.body
    return str(reply.body["access_token"])


async def test_a_socket_is_closed_with_4001_once_its_token_expires(
    base_settings: Settings,
) -> None:
    """At the token's ``exp`` the socket gets ``token_expired`` and 4001; a socket of the same
    user with a long-lived token stays and keeps receiving."""
    async with deployment(base_settings, token_leeway=0) as (system, (node,)):
        user = await system.api.user()
        cid = await group(system, user)
        token, exp = mint(user, ttl=3)
        short = await connect(node.port, token)
        long = await connect(node.port, user.access)
        assert await short.closed(within=until(exp)) == 4001
        assert time.time() >= exp
        assert errors(short) == ["token_expired"]
        await send(system, user, cid, "still here")
        await long.until(lambda: bodies(long, cid) == ["still here"])
        assert long.close_code is None
        assert errors(long) == []
        await short.close()
        await long.close()


async def test_a_fresh_token_sent_in_band_keeps_the_socket_past_the_first_expiry(
    base_settings: Settings,
) -> None:
    """A socket that sends a later ``auth`` frame before its token expires keeps receiving
    events past that expiry, with no interruption, until the fresh token's own expiry."""
    async with deployment(base_settings, token_leeway=0) as (system, (node,)):
        reader, sender = await system.api.user(), await system.api.user()
        cid = await group(system, sender, reader)
        first, first_exp = mint(reader, ttl=3)
        kept = await connect(node.port, first)
        control = await connect(node.port, first)  # same token, never refreshed
        second, second_exp = mint(reader, ttl=9)
        assert second_exp >= first_exp + 5
        await kept.send({"type": "auth", "token": second})
        hub = node.hub
        assert hub is not None
        await applied(node, lambda conn: hub.expiries.deadline(conn) == second_exp)
        await send(system, sender, cid, "before")
        assert await control.closed(within=until(first_exp)) == 4001
        assert errors(control) == ["token_expired"]
        assert time.time() >= first_exp
        await send(system, sender, cid, "after")
        await kept.until(lambda: bodies(kept, cid) == ["before", "after"])
        assert kept.close_code is None
        assert errors(kept) == []
        # The deadline moved; it did not go away.
        assert await kept.closed(within=until(second_exp)) == 4001
        assert time.time() >= second_exp
        assert errors(kept) == ["token_expired"]
        await control.close()
        await kept.close()


async def test_a_later_auth_frame_that_is_not_a_fresh_token_of_the_user_closes_with_4001(
    base_settings: Settings,
) -> None:
    """Another user's token, a forged one, an expired one and one of an ended session are
    each answered with an error frame and 4001."""
    async with deployment(base_settings, token_leeway=0) as (system, (node,)):
        alice, bob = await system.api.user(), await system.api.user()
        ended = await login(system, alice)
        reply = await system.api.call("POST", "/v1/auth/logout", token=ended)
        assert reply.status == 204
        expired, _ = mint(alice, ttl=2, age=60)
        for token, code, detail in (
            (bob.access, "unauthorized", "token of another user"),
            (alice.access + "x", "unauthorized", "invalid token"),
            (expired, "token_expired", "the new token has already expired"),
            (ended, "unauthorized", "the session has ended"),
        ):
            client = await connect(node.port, alice.access)
            await client.send({"type": "auth", "token": token})
            assert await client.closed() == 4001, detail
            assert [(f["code"], f["detail"]) for f in client.of_type("error")] == [(code, detail)]
            await client.close()


async def test_a_fresh_token_of_another_session_moves_the_socket_to_that_session(
    base_settings: Settings,
) -> None:
    """Re-authenticating with a token of the user's other live session binds the socket to
    it: ending the first session leaves the socket open, ending the second closes it."""
    async with deployment(base_settings) as (system, (node,)):
        user = await system.api.user()
        cid = await group(system, user)
        other = await login(system, user)
        client = await connect(node.port, user.access)
        await client.send({"type": "auth", "token": other})
        await applied(node, lambda conn: conn.session_id == session_of(other))
        witness = await connect(node.port, user.access)  # on the first session throughout
        reply = await system.api.call("POST", "/v1/auth/logout", token=user.access)
        assert reply.status == 204
        assert await witness.closed() == 4001
        reply = await system.api.call(
            "POST",
            f"/v1/conversations/{cid}/messages",
            token=other,
            json={"client_msg_id": "m1", "content": "on the other session"},
        )
        assert reply.status == 202, reply.body
        await client.until(lambda: bodies(client, cid) == ["on the other session"])
        assert client.close_code is None
        reply = await system.api.call("POST", "/v1/auth/logout", token=other)
        assert reply.status == 204
        assert await client.closed() == 4001
        await witness.close()
        await client.close()
