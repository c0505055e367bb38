"""Sessions on the real PostgreSQL and Redis: rotation, reuse detection, revocation that sticks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

import msgspec
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from eventstore import Pool, Settings
from ingest.auth import (
    AccessTokens,
    InvalidRefreshToken,
    InvalidToken,
    RefreshTokenReused,
    Revocation,
    SessionStore,
    SigningKey,
    TokenKeys,
    TokenPair,
)
from tests.auth_fixtures import (  # noqa: F401 - the fixtures clock, deployment, pool, redis
    T0,
    Clock,
    clock_fixture,
    deployment_fixture,
    pool_fixture,
    redis_fixture,
)


@pytest.fixture
def sessions(pool: Pool, redis: Redis, deployment: Settings, clock: Clock) -> SessionStore:
    tokens = AccessTokens(
        TokenKeys([SigningKey("t1", os.urandom(32))]),
        issuer="urn:backbone:test",
        audience="backbone-test",
        clock=clock,
    )
    return SessionStore(
        pool,
        redis,
        tokens,
        namespace=deployment.topic_prefix,
        session_ttl=30 * 86400,
        refresh_ttl=7 * 86400,
        clock=clock,
    )


async def forget_namespace(redis: Redis, namespace: str) -> None:
    """What losing Redis looks like to this deployment (other tests' keys are left alone)."""
    keys = [key async for key in redis.scan_iter(match=f"{namespace}:*")]
    if keys:
        await redis.delete(*keys)


async def next_message(feed: PubSub) -> bytes:
    """The next published payload (redis-py answers None for skipped subscribe notices)."""
    async with asyncio.timeout(5):
        while True:
            message = await feed.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                data: bytes = message["data"]
                return data


async def refused_reason(sessions: SessionStore, access_token: str) -> str | None:
    try:
        await sessions.authenticate(access_token)
    except InvalidToken as exc:
        return exc.reason
    return None


async def test_a_new_session_is_served_from_redis(
    sessions: SessionStore, redis: Redis, pool: Pool
) -> None:
    """The hot path is a cache hit: PostgreSQL is not asked while the entry lives."""
    pair = await sessions.create(uuid.uuid4())
    claims = await sessions.authenticate(pair.access_token)
    assert (claims.user_id, claims.session_id) == (pair.user_id, pair.session_id)
    key = f"{sessions.namespace}:session:{pair.session_id}"
    assert await redis.get(key) == b"1"
    assert 0 < await redis.pttl(key) <= sessions.cache_ttl * 1000
    # Behind the cache's back: the cached answer stands until the entry goes.
    await pool.execute(
        "UPDATE ingest.sessions SET revoked_at = now(), reason = 'admin' WHERE session_id = $1",
        pair.session_id,
    )
    assert await sessions.is_session_active(pair.session_id) is True
    await redis.delete(key)
    assert await sessions.is_session_active(pair.session_id) is False


async def test_refresh_rotates_and_spends_the_old_token(sessions: SessionStore) -> None:
    first = await sessions.create(uuid.uuid4())
    second = await sessions.refresh(first.refresh_token)
    assert second.session_id == first.session_id
    assert second.refresh_token != first.refresh_token
    assert len(second.refresh_token) >= 43  # 256 bits, url-safe base64
    assert (await sessions.authenticate(second.access_token)).session_id == first.session_id
    third = await sessions.refresh(second.refresh_token)
    assert third.session_id == first.session_id


async def test_a_reused_refresh_token_revokes_the_whole_family(
    sessions: SessionStore, redis: Redis, clock: Clock
) -> None:
    pair = await sessions.create(uuid.uuid4())
    rotated = await sessions.refresh(pair.refresh_token)
    clock.now += sessions.reuse_interval + 0.001  # past the reuse interval
    async with redis.pubsub() as feed:
        await feed.subscribe(sessions.revocations_channel)
        with pytest.raises(RefreshTokenReused):
            await sessions.refresh(pair.refresh_token)
        message = await next_message(feed)
    with pytest.raises(InvalidRefreshToken) as refused:
        await sessions.refresh(rotated.refresh_token)
    assert refused.value.reason == "revoked"
    assert await refused_reason(sessions, rotated.access_token) == "revoked"
    assert await refused_reason(sessions, pair.access_token) == "revoked"
    assert msgspec.json.decode(message, type=Revocation) == Revocation(
        pair.session_id, pair.user_id, "refresh_reuse"
    )


async def live_refresh_tokens(pool: Pool, session_id: uuid.UUID) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM ingest.refresh_tokens WHERE session_id = $1 AND spent_at IS NULL",
        session_id,
    )
    return count


async def test_two_refreshes_racing_with_one_token_both_get_the_one_successor(
    sessions: SessionStore, pool: Pool
) -> None:
    """Two tabs, or a retry after a lost answer: both succeed, and the family stays one chain."""
    pair = await sessions.create(uuid.uuid4())
    outcomes = await asyncio.gather(
        *(sessions.refresh(pair.refresh_token) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, TokenPair) for o in outcomes), outcomes
    pairs = [o for o in outcomes if isinstance(o, TokenPair)]
    assert len({p.refresh_token for p in pairs}) == 1, "the same successor for every caller"
    assert pairs[0].refresh_token != pair.refresh_token
    assert await live_refresh_tokens(pool, pair.session_id) == 1
    for answered in pairs:
        assert await refused_reason(sessions, answered.access_token) is None
    # The successor is an ordinary head: spending it rotates once more.
    after = await sessions.refresh(pairs[0].refresh_token)
    assert await live_refresh_tokens(pool, pair.session_id) == 1
    assert await refused_reason(sessions, after.access_token) is None


async def test_without_a_reuse_interval_racing_refreshes_cannot_both_win(
    sessions: SessionStore, pool: Pool
) -> None:
    strict = SessionStore(
        pool,
        sessions._redis,
        sessions.tokens,
        namespace=sessions.namespace,
        reuse_interval=0,
        clock=sessions._clock,
    )
    pair = await strict.create(uuid.uuid4())
    outcomes = await asyncio.gather(
        strict.refresh(pair.refresh_token),
        strict.refresh(pair.refresh_token),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["RefreshTokenReused", "TokenPair"]
    stored = await pool.fetchval(
        "SELECT successor_sealed FROM ingest.refresh_tokens WHERE session_id = $1 "
        "AND spent_at IS NOT NULL",
        pair.session_id,
    )
    assert stored is None, "no interval, nothing sealed"


async def test_reuse_after_the_interval_still_revokes_the_family(
    sessions: SessionStore, clock: Clock
) -> None:
    pair = await sessions.create(uuid.uuid4())
    rotated = await sessions.refresh(pair.refresh_token)
    clock.now += sessions.reuse_interval
    again = await sessions.refresh(pair.refresh_token)
    assert again.refresh_token == rotated.refresh_token, "at the interval's edge: still in it"
    clock.now += 0.001
    with pytest.raises(RefreshTokenReused):
        await sessions.refresh(pair.refresh_token)
    assert await refused_reason(sessions, rotated.access_token) == "revoked"
    assert await refused_reason(sessions, again.access_token) == "revoked"
    with pytest.raises(InvalidRefreshToken):
        await sessions.refresh(rotated.refresh_token)


async def test_a_spent_token_whose_successor_went_on_is_reuse_even_in_the_interval(
    sessions: SessionStore, pool: Pool
) -> None:
    """Someone continued the chain while the old token came back: that is theft, not a retry."""
    pair = await sessions.create(uuid.uuid4())
    second = await sessions.refresh(pair.refresh_token)
    third = await sessions.refresh(second.refresh_token)
    sealed = await pool.fetchval(
        "SELECT successor_sealed FROM ingest.refresh_tokens WHERE session_id = $1 "
        "AND successor_hash = $2",
        pair.session_id,
        hashlib.sha256(second.refresh_token.encode()).digest(),
    )
    assert sealed is None, "spending the successor cleared its predecessor's sealed copy"
    with pytest.raises(RefreshTokenReused):
        await sessions.refresh(pair.refresh_token)
    assert await refused_reason(sessions, third.access_token) == "revoked"


async def test_the_successor_is_stored_only_sealed_under_the_spent_token(
    sessions: SessionStore, pool: Pool
) -> None:
    pair = await sessions.create(uuid.uuid4())
    rotated = await sessions.refresh(pair.refresh_token)
    rows = await pool.fetch(
        "SELECT * FROM ingest.refresh_tokens WHERE session_id = $1", pair.session_id
    )
    for row in rows:
        for value in dict(row).values():
            if isinstance(value, bytes):
                assert rotated.refresh_token.encode() not in value
                assert pair.refresh_token.encode() not in value
    spent = next(row for row in rows if row["spent_at"] is not None)
    assert spent["successor_hash"] == hashlib.sha256(rotated.refresh_token.encode()).digest()
    assert spent["successor_sealed"] is not None
    # Tampering with the sealed copy (or a wrong key) makes it reuse, never a wrong answer.
    await pool.execute(
        "UPDATE ingest.refresh_tokens SET successor_sealed = $2 WHERE token_hash = $1",
        spent["token_hash"],
        bytes(len(spent["successor_sealed"])),
    )
    with pytest.raises(RefreshTokenReused):
        await sessions.refresh(pair.refresh_token)


async def test_logout_is_immediate_and_survives_losing_redis(
    sessions: SessionStore, redis: Redis
) -> None:
    pair = await sessions.create(uuid.uuid4())
    other = await sessions.create(pair.user_id)
    async with redis.pubsub() as feed:
        await feed.subscribe(sessions.revocations_channel)
        assert await sessions.revoke(pair.session_id, "logout") is True
        message = await next_message(feed)
    assert await refused_reason(sessions, pair.access_token) == "revoked"
    await forget_namespace(redis, sessions.namespace)
    assert await refused_reason(sessions, pair.access_token) == "revoked"
    assert await redis.get(f"{sessions.namespace}:session:{pair.session_id}") == b"0"
    assert await refused_reason(sessions, other.access_token) is None, "only that session ended"
    with pytest.raises(InvalidRefreshToken):
        await sessions.refresh(pair.refresh_token)
    assert await sessions.revoke(pair.session_id, "logout") is False
    assert msgspec.json.decode(message) == {
        "session_id": str(pair.session_id),
        "user_id": str(pair.user_id),
        "reason": "logout",
    }


async def test_revoking_a_user_ends_all_their_sessions_only(sessions: SessionStore) -> None:
    user, bystander = uuid.uuid4(), uuid.uuid4()
    mine = [await sessions.create(user) for _ in range(3)]
    theirs = await sessions.create(bystander)
    assert await sessions.revoke_user_sessions(user, "password_change") == 3
    assert await sessions.revoke_user_sessions(user, "erasure") == 0
    for pair in mine:
        assert await refused_reason(sessions, pair.access_token) == "revoked"
    assert await refused_reason(sessions, theirs.access_token) is None


async def test_refresh_tokens_and_sessions_expire(sessions: SessionStore, clock: Clock) -> None:
    idle = await sessions.create(uuid.uuid4())
    clock.now += sessions.refresh_ttl
    with pytest.raises(InvalidRefreshToken) as idle_refused:
        await sessions.refresh(idle.refresh_token)

    clock.now = T0
    busy = await sessions.create(uuid.uuid4())
    token = busy.refresh_token
    while clock.now + 6 * 86400 < T0 + sessions.session_ttl:
        clock.now += 6 * 86400
        token = (await sessions.refresh(token)).refresh_token
    clock.now = T0 + sessions.session_ttl
    with pytest.raises(InvalidRefreshToken) as busy_refused:
        await sessions.refresh(token)
    assert (idle_refused.value.reason, busy_refused.value.reason) == ("expired", "expired")


async def test_an_ended_session_is_refused_when_redis_must_ask_again(
    sessions: SessionStore, redis: Redis, clock: Clock
) -> None:
    pair = await sessions.create(uuid.uuid4())
    clock.now += sessions.session_ttl
    await forget_namespace(redis, sessions.namespace)
    assert await sessions.is_session_active(pair.session_id) is False


@pytest.mark.parametrize("token", ["", "x" * 43, "y" * 5000])
async def test_unknown_refresh_tokens_are_refused(sessions: SessionStore, token: str) -> None:
    with pytest.raises(InvalidRefreshToken) as refused:
        await sessions.refresh(token)
    assert refused.value.reason == "unknown"


async def test_only_digests_of_refresh_tokens_are_stored(
    sessions: SessionStore, pool: Pool
) -> None:
    pair = await sessions.create(uuid.uuid4())
    stored = await pool.fetch(
        "SELECT token_hash FROM ingest.refresh_tokens WHERE session_id = $1", pair.session_id
    )
    assert [len(row["token_hash"]) for row in stored] == [32]
    assert pair.refresh_token.encode() not in stored[0]["token_hash"]
