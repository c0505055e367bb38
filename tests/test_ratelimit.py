"""Rate limits and login throttling on the real Redis, and the client address behind proxies."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from eventstore import Settings
from ingest.ratelimit import (
    ClassLimits,
    Limit,
    LoginGuard,
    LoginPolicy,
    RateLimiter,
    client_ip,
)

T0 = 1_800_000_000.0
LIMITS = {
    "message": ClassLimits(per_user=Limit(rate=10, burst=5), per_ip=Limit(rate=10, burst=8)),
    "auth": ClassLimits(per_ip=Limit(rate=1, burst=3)),
}


@pytest.fixture
async def redis(base_settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(base_settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    """A Redis namespace of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def limiter(redis: Redis, namespace: str) -> RateLimiter:
    return RateLimiter(redis, namespace=namespace, limits=LIMITS)


async def test_the_burst_passes_then_the_rate_holds(limiter: RateLimiter) -> None:
    user = uuid.uuid4()
    burst = [(await limiter.check("message", user_id=user, now=T0)).allowed for _ in range(6)]
    assert burst == [True] * 5 + [False]
    refused = await limiter.check("message", user_id=user, now=T0)
    assert (refused.limited_by, refused.retry_after, refused.retry_after_header) == (
        "user",
        0.1,
        "1",
    )
    assert not (await limiter.check("message", user_id=user, now=T0 + 0.099)).allowed
    assert (await limiter.check("message", user_id=user, now=T0 + 0.1)).allowed
    assert not (await limiter.check("message", user_id=user, now=T0 + 0.1)).allowed
    after_idle = [
        (await limiter.check("message", user_id=user, now=T0 + 10)).allowed for _ in range(6)
    ]
    assert after_idle == [True] * 5 + [False], "an idle minute refills the burst, no more"


async def test_a_cost_counts_as_that_many_requests(limiter: RateLimiter) -> None:
    user = uuid.uuid4()
    assert (await limiter.check("message", user_id=user, cost=4, now=T0)).allowed
    too_many = await limiter.check("message", user_id=user, cost=2, now=T0)
    assert (too_many.allowed, too_many.retry_after) == (False, 0.1)
    assert (await limiter.check("message", user_id=user, cost=1, now=T0)).allowed


async def test_two_processes_share_one_limit(
    base_settings: Settings, namespace: str, limiter: RateLimiter
) -> None:
    """Two clients (two ingest processes) drawing on one key see one budget."""
    other_client = Redis.from_url(base_settings.redis_url)
    try:
        other = RateLimiter(other_client, namespace=namespace, limits=LIMITS)
        user = uuid.uuid4()
        allowed = [
            (await (limiter if n % 2 else other).check("message", user_id=user, now=T0)).allowed
            for n in range(8)
        ]
    finally:
        await other_client.aclose()
    assert allowed == [True] * 5 + [False] * 3


async def test_user_and_address_limits_apply_together_and_atomically(
    limiter: RateLimiter,
) -> None:
    """A request refused by one limit is not counted against the other."""
    ip, alice, bob = "192.0.2.10", uuid.uuid4(), uuid.uuid4()
    alice_results = [
        (await limiter.check("message", user_id=alice, ip=ip, now=T0)).limited_by for _ in range(7)
    ]
    assert alice_results == [None] * 5 + ["user", "user"]
    bob_results = [
        (await limiter.check("message", user_id=bob, ip=ip, now=T0)).limited_by for _ in range(4)
    ]
    assert bob_results == [None, None, None, "ip"], "alice's refusals did not spend the address"
    elsewhere = await limiter.check("message", user_id=bob, ip="192.0.2.11", now=T0)
    assert elsewhere.allowed


async def test_public_routes_are_limited_per_address_only(limiter: RateLimiter) -> None:
    allowed = [(await limiter.check("auth", ip="192.0.2.20", now=T0)).allowed for _ in range(4)]
    assert allowed == [True, True, True, False]
    assert (await limiter.check("auth", user_id=uuid.uuid4(), now=T0)).allowed


async def test_an_ipv6_subscriber_is_one_address_per_64(limiter: RateLimiter) -> None:
    first = [
        (await limiter.check("auth", ip=f"2001:db8:1:2::{n}", now=T0)).allowed for n in range(4)
    ]
    assert first == [True, True, True, False]
    assert (await limiter.check("auth", ip="2001:db8:1:3::1", now=T0)).allowed


async def test_redis_time_is_used_without_a_given_now(limiter: RateLimiter) -> None:
    ip = "192.0.2.30"
    results = [await limiter.check("auth", ip=ip) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert 0.9 < results[-1].retry_after <= 1.0


@pytest.fixture
def guard(redis: Redis, namespace: str) -> LoginGuard:
    return LoginGuard(
        redis,
        namespace=namespace,
        policy=LoginPolicy(
            ip_max_failures=5,
            ip_window=60,
            ip_block=300,
            account_max_failures=3,
            account_window=120,
        ),
    )


async def test_an_address_failing_across_accounts_is_blocked_for_a_period(
    guard: LoginGuard,
) -> None:
    ip = "198.51.100.1"
    verdicts = [await guard.record_failure(ip, f"victim{n}", now=T0) for n in range(5)]
    assert [v.allowed for v in verdicts] == [True] * 4 + [False]
    assert (verdicts[-1].reason, verdicts[-1].retry_after) == ("ip_blocked", 300)
    blocked = await guard.check(ip, "anyone-at-all", now=T0 + 100)
    assert (blocked.allowed, blocked.reason, blocked.retry_after) == (False, "ip_blocked", 200)
    assert (await guard.check("198.51.100.2", "victim0", now=T0 + 100)).allowed
    assert (await guard.check(ip, "anyone-at-all", now=T0 + 300)).allowed


async def test_failures_spread_out_in_time_do_not_block(guard: LoginGuard) -> None:
    ip = "198.51.100.3"
    for n in range(8):
        verdict = await guard.record_failure(ip, f"user{n}", now=T0 + n * 30)
        assert verdict.allowed, "at most two failures fall in any one 60 s window"


async def test_an_account_is_throttled_only_from_the_failing_address(guard: LoginGuard) -> None:
    attacker, owner = "203.0.113.5", "203.0.113.6"
    verdicts = [await guard.record_failure(attacker, "Alice", now=T0) for _ in range(3)]
    assert [v.reason for v in verdicts] == [None, None, "account_throttled"]
    throttled = await guard.check(attacker, "alice", now=T0 + 20)
    assert (throttled.reason, throttled.retry_after) == ("account_throttled", 100)
    assert (await guard.check(owner, "ALICE", now=T0 + 20)).allowed
    assert (await guard.check(attacker, "bob", now=T0 + 20)).allowed
    assert (await guard.check(attacker, "alice", now=T0 + 120)).allowed


async def test_success_clears_the_pair_but_not_the_address(guard: LoginGuard) -> None:
    ip = "203.0.113.7"
    for _ in range(2):
        await guard.record_failure(ip, "carol", now=T0)
    await guard.record_success(ip, "carol")
    assert (await guard.record_failure(ip, "carol", now=T0)).allowed
    assert (await guard.record_failure(ip, "carol", now=T0)).allowed
    fifth = await guard.record_failure(ip, "dave", now=T0)
    assert fifth.reason == "ip_blocked", "the address kept counting through the success"


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ff::/48"))


@pytest.mark.parametrize(
    ("remote", "forwarded_for", "expected"),
    [
        pytest.param(
            "198.51.100.9", ["1.2.3.4"], "198.51.100.9", id="untrusted-peer-header-ignored"
        ),
        pytest.param("10.0.0.1", [], "10.0.0.1", id="trusted-peer-no-header"),
        pytest.param("10.0.0.1", ["198.51.100.9"], "198.51.100.9", id="one-proxy"),
        pytest.param(
            "10.0.0.1", ["6.6.6.6, 198.51.100.9, 10.0.0.2"], "198.51.100.9", id="spoofed-left-part"
        ),
        pytest.param(
            "10.0.0.1", ["6.6.6.6", "198.51.100.9"], "198.51.100.9", id="client-sent-own-line"
        ),
        pytest.param("10.0.0.1", ["10.1.1.1, 10.2.2.2"], "10.1.1.1", id="all-trusted-leftmost"),
        pytest.param("10.0.0.1", ["6.6.6.6, garbage, 10.0.0.3"], "10.0.0.3", id="garbage-stops"),
        pytest.param("10.0.0.1", ["198.51.100.9:4711"], "198.51.100.9", id="v4-with-port"),
        pytest.param("10.0.0.1", ["[2001:db8::7]:443"], "2001:db8::7", id="v6-bracketed"),
        pytest.param("2001:db8:ff::1", ["2001:db8::8"], "2001:db8::8", id="v6-proxy"),
        pytest.param("::ffff:10.0.0.1", ["198.51.100.9"], "198.51.100.9", id="v4-mapped-peer"),
        pytest.param(None, ["198.51.100.9"], "unknown", id="no-peer"),
    ],
)
def test_client_ip_walks_forwarded_for_from_the_right(
    remote: str | None, forwarded_for: list[str], expected: str
) -> None:
    assert client_ip(remote, forwarded_for, TRUSTED) == expected
