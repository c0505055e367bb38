"""API keys on the real PostgreSQL and Redis: shown once, stored hashed, scoped, revocable,
cached per process while the revocation feed is heard."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import pytest
from redis.asyncio import Redis

from eventstore import Pool, Settings
from ingest.auth import (
    NO_SESSION,
    SCOPES,
    ApiKeys,
    InvalidApiKey,
    InvalidScope,
    Notice,
    RevocationFeed,
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
def keys(pool: Pool, clock: Clock) -> ApiKeys:
    return ApiKeys(pool, touch_interval=60, clock=clock)


class CountingPool:
    """The pool, counting every use: how a test sees whether PostgreSQL was asked."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.uses = 0
        self.before_answer: Any = None
        """Called (sync) between a query's answer and its return: a stand-in for "meanwhile"."""

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.pool, name)
        if name not in ("fetchrow", "fetch", "fetchval", "execute", "acquire"):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.uses += 1
            if name == "acquire":
                return attribute(*args, **kwargs)

            async def run() -> Any:
                answer = await attribute(*args, **kwargs)
                if self.before_answer is not None:
                    self.before_answer()
                return answer

            return run()

        return counted


async def active_owner(pool: Pool) -> uuid.UUID:
    """A user id with an active account (keys act only for active accounts)."""
    user_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO ingest.accounts (user_id, username_lc, email_lc, password_hash, state, "
        "created_at) VALUES ($1, $2, $3, 'not-a-real-hash', 'active', $4)",
        user_id,
        f"u{user_id.hex}",
        f"u{user_id.hex}@example.test",
        datetime.now(UTC),
    )
    return user_id


@pytest.fixture
def counting(pool: Pool) -> CountingPool:
    return CountingPool(pool)


@pytest.fixture
def cached(counting: CountingPool, clock: Clock, deployment: Settings) -> ApiKeys:
    """Keys with the cache on, as if the revocation feed were up (no Redis involved)."""
    keys = ApiKeys(cast(Pool, counting), namespace=deployment.topic_prefix, clock=clock)
    keys.up()
    return keys


async def refusal(keys: ApiKeys, presented: str) -> str:
    with pytest.raises(InvalidApiKey) as refused:
        await keys.verify(presented)
    return refused.value.reason


async def test_a_key_verifies_to_its_owner_and_scopes(keys: ApiKeys, pool: Pool) -> None:
    owner = await active_owner(pool)
    key_id, presented = await keys.create(owner, ["read", "messages:write", "read"], "bot")
    assert presented.startswith(f"bbk_{key_id}_")
    verified = await keys.verify(presented)
    assert (verified.key_id, verified.owner_id, verified.name) == (key_id, owner, "bot")
    assert verified.scopes == frozenset({"read", "messages:write"})
    assert verified.allows("read")
    assert not verified.allows("conversations:write")


async def test_only_the_digest_of_the_secret_is_stored(keys: ApiKeys, pool: Pool) -> None:
    key_id, presented = await keys.create(await active_owner(pool), ["read"], "digest")
    secret = presented.split("_", 2)[2]
    row = await pool.fetchrow("SELECT * FROM ingest.api_keys WHERE key_id = $1", key_id)
    assert row is not None
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).digest()
    assert not any(secret in str(value) for value in dict(row).values())


async def test_forged_and_revoked_keys_are_refused(keys: ApiKeys, pool: Pool) -> None:
    key_id, presented = await keys.create(await active_owner(pool), sorted(SCOPES), "victim")
    flipped = presented[:-1] + ("A" if presented[-1] != "A" else "B")
    other_id = f"bbk_{'0' * 16}_{presented.split('_', 2)[2]}"
    reasons = [
        await refusal(keys, flipped),
        await refusal(keys, other_id),
        await refusal(keys, "bbk_short"),
        await refusal(keys, presented + "x"),
        await refusal(keys, ""),
    ]
    assert reasons == ["mismatch", "unknown", "malformed", "malformed", "malformed"]
    assert await keys.revoke(key_id) is True
    assert await keys.revoke(key_id) is False
    assert await refusal(keys, presented) == "revoked"


async def test_an_owner_can_revoke_only_their_own_keys(keys: ApiKeys, pool: Pool) -> None:
    owner, stranger = await active_owner(pool), await active_owner(pool)
    key_id, presented = await keys.create(owner, ["read"], "mine")
    assert await keys.revoke_owned(key_id, stranger) is False
    assert (await keys.verify(presented)).owner_id == owner
    assert await keys.revoke_owned(key_id, owner) is True
    assert await refusal(keys, presented) == "revoked"


async def test_erasing_an_owner_revokes_all_their_keys(keys: ApiKeys, pool: Pool) -> None:
    owner, bystander = await active_owner(pool), await active_owner(pool)
    presented = [(await keys.create(owner, ["read"], f"k{n}"))[1] for n in range(2)]
    _, kept = await keys.create(bystander, ["read"], "kept")
    assert await keys.revoke_owner(owner) == 2
    assert [await refusal(keys, p) for p in presented] == ["revoked", "revoked"]
    assert (await keys.verify(kept)).owner_id == bystander


@pytest.mark.parametrize("scopes", [["admin"], [], ["read", "messages:delete"]])
async def test_unknown_scopes_are_refused(keys: ApiKeys, scopes: list[str]) -> None:
    with pytest.raises(InvalidScope):
        await keys.create(uuid.uuid4(), scopes, "bad")


async def test_last_use_is_recorded_at_most_once_a_minute(
    keys: ApiKeys, pool: Pool, clock: Clock
) -> None:
    key_id, presented = await keys.create(await active_owner(pool), ["read"], "busy")

    async def last_used() -> float | None:
        value = await pool.fetchval(
            "SELECT last_used_at FROM ingest.api_keys WHERE key_id = $1", key_id
        )
        return None if value is None else value.timestamp()

    assert await last_used() is None
    await keys.verify(presented)
    clock.now += 30
    await keys.verify(presented)
    assert await last_used() == T0
    clock.now += 30
    await keys.verify(presented)
    assert await last_used() == T0 + 60


async def test_a_key_acts_only_while_its_owner_is_active(keys: ApiKeys, pool: Pool) -> None:
    owner = await active_owner(pool)
    _, presented = await keys.create(owner, ["read"], "erased later")
    _, orphan = await keys.create(uuid.uuid4(), ["read"], "no account")
    assert (await keys.verify(presented)).owner_id == owner
    await pool.execute(
        "UPDATE ingest.accounts SET state = 'erased', username_lc = NULL, email_lc = NULL, "
        "password_hash = NULL WHERE user_id = $1",
        owner,
    )
    assert await refusal(keys, presented) == "owner_inactive"
    assert await refusal(keys, orphan) == "owner_inactive"


# --- the in-process cache ------------------------------------------------------------------


async def test_a_cached_key_costs_no_database_round_trip(
    cached: ApiKeys, counting: CountingPool, pool: Pool
) -> None:
    owner = await active_owner(pool)
    key_id, presented = await cached.create(owner, ["read"], "hot")
    counting.uses = 0
    first = await cached.verify(presented)
    assert counting.uses == 2, "a miss: the lookup, and the first last-use record"
    counting.uses = 0
    for _ in range(100):
        assert await cached.verify(presented) == first
    assert counting.uses == 0
    # Behind the cache's back (no feed message): the cached answer stands, so it was not asked.
    await pool.execute("UPDATE ingest.api_keys SET revoked_at = now() WHERE key_id = $1", key_id)
    assert (await cached.verify(presented)).key_id == key_id


async def test_the_cache_is_keyed_by_digest_and_never_holds_the_secret(
    cached: ApiKeys, pool: Pool
) -> None:
    _, presented = await cached.create(await active_owner(pool), ["read"], "secretive")
    await cached.verify(presented)
    secret = presented.split("_", 2)[2]
    held = cached._cache  # what the process keeps
    assert list(held) == [hashlib.sha256(secret.encode()).digest()]
    assert secret not in repr(held)
    assert presented not in repr(held)
    # A forged key with a real key's id and a wrong secret is still checked (and refused).
    key_id = presented.split("_")[1]
    assert await refusal(cached, f"bbk_{key_id}_{'A' * 43}") == "mismatch"
    # The right secret under another id is not the cached key.
    assert await refusal(cached, f"bbk_{'0' * 16}_{secret}") == "unknown"


async def test_cached_entries_expire_after_the_ttl(
    cached: ApiKeys, counting: CountingPool, clock: Clock, pool: Pool
) -> None:
    key_id, presented = await cached.create(await active_owner(pool), ["read"], "aging")
    await cached.verify(presented)
    await pool.execute("UPDATE ingest.api_keys SET revoked_at = now() WHERE key_id = $1", key_id)
    clock.now += cached.cache_ttl - 1
    assert (await cached.verify(presented)).key_id == key_id
    clock.now += 1
    assert await refusal(cached, presented) == "revoked", "past the TTL PostgreSQL is asked"


async def test_revocation_notices_drop_keys_by_id_and_by_owner(
    cached: ApiKeys, counting: CountingPool, pool: Pool
) -> None:
    owner, other = await active_owner(pool), await active_owner(pool)
    first_id, first = await cached.create(owner, ["read"], "a")
    _, second = await cached.create(owner, ["read"], "b")
    _, theirs = await cached.create(other, ["read"], "c")
    for presented in (first, second, theirs):
        await cached.verify(presented)
    await pool.execute("UPDATE ingest.api_keys SET revoked_at = now() WHERE key_id = $1", first_id)
    cached.notice(Notice(user_id=owner, key_id=first_id, reason="api_key"))
    assert await refusal(cached, first) == "revoked"
    # Any notice naming the owner (a session of theirs ended) drops their cached keys: the
    # account may have changed state with it.
    await pool.execute(
        "UPDATE ingest.accounts SET state = 'erased', username_lc = NULL, email_lc = NULL, "
        "password_hash = NULL WHERE user_id = $1",
        owner,
    )
    counting.uses = 0
    assert (await cached.verify(theirs)).owner_id == other
    assert counting.uses == 0, "the other owner's key is still cached"
    cached.notice(Notice(user_id=owner, session_id=uuid.uuid4(), reason="erasure"))
    assert await refusal(cached, second) == "owner_inactive"
    # An unreadable message on the channel is taken as "anything may be revoked".
    cached.notice(None)
    counting.uses = 0
    await cached.verify(theirs)
    assert counting.uses > 0


async def test_a_lookup_overlapping_a_revocation_is_not_cached(
    cached: ApiKeys, counting: CountingPool, pool: Pool
) -> None:
    owner = await active_owner(pool)
    key_id, presented = await cached.create(owner, ["read"], "racing")
    # The revocation is heard while the lookup's (older) answer is on its way back.
    counting.before_answer = lambda: cached.notice(Notice(user_id=owner, key_id=key_id))
    await cached.verify(presented)
    counting.before_answer = None
    counting.uses = 0
    await cached.verify(presented)
    assert counting.uses > 0, "the overlapping answer was not cached"
    counting.uses = 0
    await cached.verify(presented)
    assert counting.uses == 0


async def test_the_cache_is_bounded_and_off_while_the_feed_is_down(
    counting: CountingPool, clock: Clock, pool: Pool, deployment: Settings
) -> None:
    keys = ApiKeys(
        cast(Pool, counting), namespace=deployment.topic_prefix, cache_size=2, clock=clock
    )
    owner = await active_owner(pool)
    presented = [(await keys.create(owner, ["read"], f"k{n}"))[1] for n in range(3)]
    await keys.verify(presented[0])
    assert not keys.caching, "no feed heard yet: no cache"
    assert len(keys._cache) == 0
    keys.up()
    for p in presented:
        await keys.verify(p)
    assert len(keys._cache) == 2
    counting.uses = 0
    await keys.verify(presented[2])
    assert counting.uses == 0
    keys.down()
    assert not keys.caching
    assert len(keys._cache) == 0
    await keys.verify(presented[2])
    assert counting.uses > 0
    assert not ApiKeys(cast(Pool, counting), cache_ttl=0).caching


async def next_payload(redis: Redis, channel: str, act: Any) -> Any:
    async with redis.pubsub() as feed:
        await feed.subscribe(channel)
        await act()
        async with asyncio.timeout(5):
            while True:
                message = await feed.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    return msgspec.json.decode(message["data"])


async def test_revocations_are_published_after_the_commit_in_a_compatible_form(
    pool: Pool, redis: Redis, deployment: Settings, clock: Clock
) -> None:
    keys = ApiKeys(pool, redis=redis, namespace=deployment.topic_prefix, clock=clock)
    owner = await active_owner(pool)
    key_id, _ = await keys.create(owner, ["read"], "announced")
    channel = f"{deployment.topic_prefix}:revocations"

    async def revoke() -> None:
        assert await keys.revoke_owned(key_id, owner) is True

    published = await next_payload(redis, channel, revoke)
    assert published == {
        "session_id": str(NO_SESSION),
        "user_id": str(owner),
        "reason": "api_key",
        "key_id": key_id,
    }
    # Readable by the fanout tier's decoder (which requires session_id and user_id).
    from fanout.signals import RevocationSignal

    signal = msgspec.json.decode(msgspec.json.encode(published), type=RevocationSignal)
    assert signal.session_id == NO_SESSION
    key_ids = [(await keys.create(owner, ["read"], f"e{n}"))[0] for n in range(2)]

    async def erase() -> None:
        assert await keys.revoke_owner(owner) == 2

    published = await next_payload(redis, channel, erase)
    assert published["key_id"] in key_ids


async def kill_connection(redis: Redis, feed: RevocationFeed) -> None:
    """Drop the feed's own connection from the server side (CLIENT KILL by its address)."""
    pubsub_addresses = {
        client["addr"] for client in await redis.client_list() if client.get("sub") != "0"
    }
    killed = 0
    for address in pubsub_addresses:
        if address in feed_addresses(feed):
            killed += await redis.execute_command("CLIENT", "KILL", "ADDR", address)
    assert killed, (pubsub_addresses, feed_addresses(feed))


def feed_addresses(feed: RevocationFeed) -> set[str]:
    pool = feed._redis.connection_pool
    found = set()
    for conn in [*pool._in_use_connections, *pool._available_connections]:
        writer = getattr(conn, "_writer", None)
        if writer is not None:
            host, port = writer.get_extra_info("sockname")[:2]
            found.add(f"{host}:{port}")
    return found


async def test_losing_the_feed_empties_the_cache_until_it_is_back(
    pool: Pool, deployment: Settings
) -> None:
    counting = CountingPool(pool)
    own = Redis.from_url(deployment.redis_url)  # the feed's own client: only it is cut off
    admin = Redis.from_url(deployment.redis_url)
    keys = ApiKeys(cast(Pool, counting), redis=own, namespace=deployment.topic_prefix)
    feed = RevocationFeed(own, keys.revocations_channel or "", keys, heartbeat=1.0)
    await feed.start()
    try:
        assert keys.caching
        key_id, presented = await keys.create(await active_owner(pool), ["read"], "survivor")
        await keys.verify(presented)
        counting.uses = 0
        await keys.verify(presented)
        assert counting.uses == 0
        await kill_connection(admin, feed)
        async with asyncio.timeout(5):
            while feed.live.is_set():
                await asyncio.sleep(0.01)
        assert not keys.caching
        assert len(keys._cache) == 0
        # Meanwhile a revocation happens that this process could not hear...
        await pool.execute(
            "UPDATE ingest.api_keys SET revoked_at = now() WHERE key_id = $1", key_id
        )
        # ...and after the resubscription the key is looked up again, not served from memory.
        async with asyncio.timeout(10):
            await feed.live.wait()
        assert keys.caching
        assert await refusal(keys, presented) == "revoked"
    finally:
        await feed.stop()
        assert not keys.caching
        await own.aclose()
        await admin.aclose()
