"""API keys on the real PostgreSQL: shown once, stored hashed, scoped, revocable."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest

from eventstore import Pool, Settings, create_pool
from ingest.auth import SCOPES, ApiKeys, InvalidApiKey, InvalidScope
from tests.store_fixtures import isolated

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def pool(base_settings: Settings) -> AsyncIterator[Pool]:
    deployment = await isolated(base_settings)
    pool = await create_pool(deployment.postgres_dsn, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(pool: Pool, clock: Clock) -> ApiKeys:
    return ApiKeys(pool, touch_interval=60, clock=clock)


async def refusal(keys: ApiKeys, presented: str) -> str:
    with pytest.raises(InvalidApiKey) as refused:
        await keys.verify(presented)
    return refused.value.reason


async def test_a_key_verifies_to_its_owner_and_scopes(keys: ApiKeys) -> None:
    owner = uuid.uuid4()
    key_id, presented = await keys.create(owner, ["read", "messages:write", "read"], "bot")
    assert presented.startswith(f"bbk_{key_id}_")
    verified = await keys.verify(presented)
    assert (verified.key_id, verified.owner_id, verified.name) == (key_id, owner, "bot")
    assert verified.scopes == frozenset({"read", "messages:write"})
    assert verified.allows("read")
    assert not verified.allows("conversations:write")


async def test_only_the_digest_of_the_secret_is_stored(keys: ApiKeys, pool: Pool) -> None:
    key_id, presented = await keys.create(uuid.uuid4(), ["read"], "digest")
    secret = presented.split("_", 2)[2]
    row = await pool.fetchrow("SELECT * FROM ingest.api_keys WHERE key_id = $1", key_id)
    assert row is not None
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).digest()
    assert not any(secret in str(value) for value in dict(row).values())


async def test_forged_and_revoked_keys_are_refused(keys: ApiKeys) -> None:
    key_id, presented = await keys.create(uuid.uuid4(), sorted(SCOPES), "victim")
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


async def test_an_owner_can_revoke_only_their_own_keys(keys: ApiKeys) -> None:
    owner, stranger = uuid.uuid4(), uuid.uuid4()
    key_id, presented = await keys.create(owner, ["read"], "mine")
    assert await keys.revoke_owned(key_id, stranger) is False
    assert (await keys.verify(presented)).owner_id == owner
    assert await keys.revoke_owned(key_id, owner) is True
    assert await refusal(keys, presented) == "revoked"


async def test_erasing_an_owner_revokes_all_their_keys(keys: ApiKeys) -> None:
    owner, bystander = uuid.uuid4(), uuid.uuid4()
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
    key_id, presented = await keys.create(uuid.uuid4(), ["read"], "busy")

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
