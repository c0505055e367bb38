"""Rate limits and login blocking hold across two ingest processes sharing Redis."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient, TestServer

from eventstore import Settings
from ingest.app import KEYS, create_app
from ingest.config import IngestConfig
from ingest.ratelimit import DEFAULT_LIMITS, ClassLimits, Limit, LoginPolicy
from schemas.api import SendBatchBody
from tests.system_fixtures import GENEROUS, Api, ingest_config, running_system

PROXY = {"trusted_proxies": (ipaddress.ip_network("127.0.0.0/8"),)}


@contextlib.asynccontextmanager
async def second_process(base: Any, config: IngestConfig) -> AsyncIterator[Api]:
    """Another ingest app over the same deployment: what a second worker process is."""
    app = create_app(base.settings, config, base.api.client.app[KEYS])
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Api(client)


def ip(n: int) -> dict[str, str]:
    return {"X-Forwarded-For": f"203.0.113.{n}"}


async def test_message_limit_is_shared_by_two_processes(base_settings: Settings) -> None:
    limits = dict(GENEROUS)
    limits["message"] = ClassLimits(per_user=Limit(rate=0.5, burst=6), per_ip=Limit(10_000, 10_000))
    config = ingest_config(rate_limits=limits)
    async with running_system(base_settings, config) as system:
        one = system.api
        alice = await one.user()
        cid = (
            await one.call("POST", "/v1/conversations", token=alice.access, json={"name": "r"})
        ).body["conversation_id"]
        async with second_process(system, config) as two:
            statuses = []
            for n in range(10):
                api = one if n % 2 else two
                reply = await api.call(
                    "POST",
                    f"/v1/conversations/{cid}/messages",
                    token=alice.access,
                    json={"client_msg_id": f"m{n}", "content": "x"},
                )
                statuses.append(reply.status)
                if reply.status == 429:
                    assert int(reply.headers["Retry-After"]) >= 1
                    assert reply.body["type"] == "urn:backbone:problem:rate-limited"
        # The burst of 6 is shared: the 7th request overall is refused, whichever process.
        assert statuses == [202] * 6 + [429] * 4
        # Refused sends wrote nothing.
        page = await one.call("GET", f"/v1/conversations/{cid}/messages", token=alice.access)
        assert len(page.body["items"]) <= 6


async def test_login_ip_blocking_across_processes_spares_the_real_user(
    base_settings: Settings,
) -> None:
    policy = LoginPolicy(
        ip_max_failures=4, ip_window=600, ip_block=600, account_max_failures=3, account_window=600
    )
    config = ingest_config(login_policy=policy, **PROXY)
    async with running_system(base_settings, config) as system:
        one = system.api
        victim = await one.user()
        async with second_process(system, config) as two:
            attacker = ip(66)
            statuses = []
            for n in range(6):
                api = one if n % 2 else two
                reply = await api.call(
                    "POST",
                    "/v1/auth/login",
                    json={"login": victim.username, "password": f"guess number {n}"},
                    headers=attacker,
                )
                statuses.append(reply.status)
            # 3 failures throttle the (account, address) pair; later attempts are refused
            # without checking the password, in either process.
            assert statuses[:3] == [401, 401, 401]
            assert set(statuses[3:]) == {429}
            # The attacker's address cannot try other accounts once blocked either.
            other = await one.call(
                "POST",
                "/v1/auth/login",
                json={"login": "someone-else", "password": "guess it"},
                headers=attacker,
            )
            other2 = await two.call(
                "POST",
                "/v1/auth/login",
                json={"login": "someone-else2", "password": "guess it"},
                headers=attacker,
            )
            blocked = await one.call(
                "POST",
                "/v1/auth/login",
                json={"login": "someone-else3", "password": "guess it"},
                headers=attacker,
            )
            # Refused attempts were not password checks: the address has 3 failures, the 4th
            # (another account) blocks it, and from then on every login from it is refused.
            assert other.status == 401
            assert (other2.status, blocked.status) == (429, 429)
            assert blocked.body["type"] == "urn:backbone:problem:ip-blocked"
            # The real user, from their own address, logs in (correct password) on both.
            for api in (one, two):
                ok = await api.call(
                    "POST",
                    "/v1/auth/login",
                    json={"login": victim.username, "password": victim.password},
                    headers=ip(7),
                )
                assert ok.status == 200


async def test_untrusted_peers_cannot_spoof_their_address(base_settings: Settings) -> None:
    policy = LoginPolicy(
        ip_max_failures=2, ip_window=600, ip_block=600, account_max_failures=100, account_window=600
    )
    # No trusted proxies: X-Forwarded-For is ignored and the TCP peer (127.0.0.1) is the client.
    config = msgspec.structs.replace(ingest_config(login_policy=policy), trusted_proxies=())
    async with running_system(base_settings, config) as system:
        api = system.api
        for n in range(3):
            await api.call(
                "POST",
                "/v1/auth/login",
                json={"login": f"nobody{n}", "password": "guess it"},
                headers=ip(n),
            )
        reply = await api.call(
            "POST",
            "/v1/auth/login",
            json={"login": "nobody9", "password": "guess it"},
            headers=ip(99),
        )
        assert reply.status == 429


def test_default_message_limits_admit_the_largest_batch() -> None:
    """A batch costs one unit per message; a burst below the largest batch would refuse it
    forever (GCRA can never admit a cost above its burst)."""
    largest = msgspec.json.schema(SendBatchBody)["$defs"]["SendBatchBody"]["properties"][
        "messages"
    ]["maxItems"]
    limits = DEFAULT_LIMITS["message"]
    assert limits.per_user is not None
    assert limits.per_ip is not None
    assert min(limits.per_user.burst, limits.per_ip.burst) >= largest
