"""The credential store on the real PostgreSQL: reservation, login, erasure, throttled login."""

from __future__ import annotations

import asyncio
import uuid

import bcrypt
import pytest
from redis.asyncio import Redis

from eventstore import Pool, Settings
from ingest.auth import Accounts, BadCredentials, PasswordHasher, Taken
from ingest.ratelimit import LoginGuard, LoginPolicy
from tests.auth_fixtures import (  # noqa: F401 - the fixtures clock, deployment, pool
    T0,
    Clock,
    clock_fixture,
    deployment_fixture,
    pool_fixture,
)

PASSWORD = "a long and unusual passphrase"


def unique(kind: str) -> str:
    return f"{kind}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(cost=12)


@pytest.fixture(scope="module")
async def password_hash(hasher: PasswordHasher) -> str:
    return await hasher.hash(PASSWORD)


@pytest.fixture
def accounts(pool: Pool, hasher: PasswordHasher, clock: Clock) -> Accounts:
    return Accounts(pool, hasher, pending_timeout=300, clock=clock)


async def active_account(accounts: Accounts, password_hash: str) -> tuple[uuid.UUID, str, str]:
    username, email = unique("user"), f"{unique('mail')}@example.com"
    user_id = await accounts.reserve(username, email, password_hash)
    assert await accounts.activate(user_id)
    return user_id, username, email


async def test_uniqueness_is_case_insensitive_per_field(
    accounts: Accounts, password_hash: str
) -> None:
    username, email = unique("Alice"), f"{unique('Alice')}@Example.com"
    await accounts.reserve(username, email, password_hash)
    with pytest.raises(Taken) as name_taken:
        await accounts.reserve(username.upper(), f"{unique('x')}@example.com", password_hash)
    with pytest.raises(Taken) as email_taken:
        await accounts.reserve(unique("bob"), email.lower(), password_hash)
    assert (name_taken.value.field, email_taken.value.field) == ("username", "email")


async def test_racing_registrations_of_one_name_yield_one_account(
    accounts: Accounts, password_hash: str
) -> None:
    username = unique("race")
    outcomes = await asyncio.gather(
        *(
            accounts.reserve(username, f"{unique('m')}@example.com", password_hash)
            for _ in range(5)
        ),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["Taken"] * 4 + ["UUID"]


async def test_a_pending_account_cannot_log_in_until_activated(
    accounts: Accounts, password_hash: str
) -> None:
    username, email = unique("pending"), f"{unique('p')}@example.com"
    user_id = await accounts.reserve(username, email, password_hash)
    assert await accounts.find_for_login(username) is None
    assert await accounts.activate(user_id)
    by_name = await accounts.find_for_login(username.upper())
    by_email = await accounts.find_for_login(email.upper())
    assert by_name is not None
    assert by_email == by_name
    assert (by_name.user_id, by_name.state, by_name.role) == (user_id, "active", "user")


async def test_a_released_reservation_frees_the_name(
    accounts: Accounts, password_hash: str
) -> None:
    username, email = unique("rel"), f"{unique('r')}@example.com"
    first = await accounts.reserve(username, email, password_hash)
    assert await accounts.release(first)
    assert not await accounts.activate(first), "a released reservation cannot come back"
    second = await accounts.reserve(username, email, password_hash)
    assert await accounts.activate(second)
    assert not await accounts.release(second), "an active account is not a reservation"


async def test_only_a_stale_reservation_is_reclaimed(
    accounts: Accounts, clock: Clock, password_hash: str
) -> None:
    username, email = unique("stale"), f"{unique('s')}@example.com"
    abandoned = await accounts.reserve(username, email, password_hash)
    clock.now += 299
    with pytest.raises(Taken):
        await accounts.reserve(username, f"{unique('o')}@example.com", password_hash)
    clock.now += 2
    reclaimed = await accounts.reserve(username, email, password_hash)
    assert reclaimed != abandoned
    assert not await accounts.activate(abandoned)
    assert await accounts.activate(reclaimed)


async def test_login_by_name_or_email_with_the_right_password(
    accounts: Accounts, password_hash: str
) -> None:
    user_id, username, email = await active_account(accounts, password_hash)
    assert (await accounts.authenticate(username.title(), PASSWORD)).user_id == user_id
    with pytest.raises(BadCredentials):
        await accounts.authenticate(email, PASSWORD + "!")


async def test_an_unknown_login_spends_one_verification_at_full_cost(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No enumeration by timing: the unknown-account path runs one real bcrypt check."""
    checked: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    with pytest.raises(BadCredentials):
        await accounts.authenticate(unique("nobody"), PASSWORD)
    assert len(checked) == 1
    assert checked[0].startswith(b"$2b$12$")


async def test_a_password_change_replaces_the_hash(
    accounts: Accounts, hasher: PasswordHasher, password_hash: str
) -> None:
    user_id, username, _ = await active_account(accounts, password_hash)
    assert await accounts.verify_password(user_id, PASSWORD) is True
    assert await accounts.verify_password(user_id, "not " + PASSWORD) is False
    assert await accounts.verify_password(uuid.uuid4(), PASSWORD) is False
    new_password = "another long and unusual passphrase"
    assert await accounts.set_password(user_id, await hasher.hash(new_password))
    assert (await accounts.authenticate(username, new_password)).user_id == user_id
    with pytest.raises(BadCredentials):
        await accounts.authenticate(username, PASSWORD)


async def test_erasure_drops_credentials_and_releases_the_name(
    accounts: Accounts, pool: Pool, password_hash: str
) -> None:
    user_id, username, email = await active_account(accounts, password_hash)
    assert await accounts.mark_erased(user_id)
    assert not await accounts.mark_erased(user_id)
    assert await accounts.find_for_login(username) is None
    row = await pool.fetchrow(
        "SELECT username_lc, email_lc, password_hash, state FROM ingest.accounts "
        "WHERE user_id = $1",
        user_id,
    )
    assert row is not None
    assert dict(row) == {
        "username_lc": None,
        "email_lc": None,
        "password_hash": None,
        "state": "erased",
    }
    account = await accounts.get(user_id)
    assert account is not None
    assert account.state == "erased"
    await accounts.reserve(username, email, password_hash)


async def test_an_attacker_cannot_lock_the_owner_out(
    accounts: Accounts, deployment: Settings, password_hash: str
) -> None:
    """Failures from one address block that address; the owner elsewhere still logs in."""
    _, username, _ = await active_account(accounts, password_hash)
    redis = Redis.from_url(deployment.redis_url)
    guard = LoginGuard(
        redis,
        namespace=unique(deployment.topic_prefix),
        policy=LoginPolicy(account_max_failures=3, ip_max_failures=5),
    )
    attacker, owner = "203.0.113.9", "198.51.100.7"

    async def attempt(ip: str, password: str) -> str:
        verdict = await guard.check(ip, username, now=T0)
        if not verdict.allowed:
            return f"refused:{verdict.reason}"
        try:
            await accounts.authenticate(username, password)
        except BadCredentials:
            await guard.record_failure(ip, username, now=T0)
            return "bad"
        await guard.record_success(ip, username)
        return "ok"

    try:
        attacks = [await attempt(attacker, f"guess-{n}") for n in range(4)]
        assert attacks == ["bad", "bad", "bad", "refused:account_throttled"]
        assert await attempt(owner, PASSWORD) == "ok"
        assert await attempt(attacker, PASSWORD) == "refused:account_throttled"
    finally:
        await redis.aclose()
