"""Data keys in PostgreSQL: created once, wrapped by the master key, rotatable, erasable."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

import asyncpg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore import EventStore, KeyRing, KeyStoreUnavailable, MasterKey, Settings, SubjectErased
from eventstore.errors import DecodeError
from eventstore.keyring import seal, sealed_bytes, unseal
from schemas import ERASED


def roundtrip(key_a: AESGCM, key_b: AESGCM | None, subject: uuid.UUID) -> str | object:
    event = uuid.uuid4()
    return unseal({subject: key_b}, event, seal(key_a, subject, event, "hello"))


async def test_concurrent_writers_converge_on_one_key(store: EventStore) -> None:
    subject = uuid.uuid4()
    rings = [KeyRing(store.pool, store.settings.master_keys) for _ in range(5)]
    keys = await asyncio.gather(*(r.keys_for_write([subject]) for r in rings))
    first = keys[0][subject]
    for other in keys[1:]:
        assert roundtrip(first, other[subject], subject) == "hello"
    async with store.pool.acquire() as conn:
        count = await conn.fetchval("SELECT count(*) FROM data_keys WHERE subject=$1", subject)
    assert count == 1


async def test_keys_are_stored_wrapped_never_in_clear(store: EventStore) -> None:
    subject = uuid.uuid4()
    await store.keyring.keys_for_write([subject])
    async with store.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT master_key_id, wrapped FROM data_keys WHERE subject=$1", subject
        )
    assert row is not None
    assert row["master_key_id"] == store.settings.master_key.key_id
    assert len(row["wrapped"]) == 12 + 32 + 16  # nonce + AES-GCM(32-byte key) + tag


async def test_an_old_master_key_still_unwraps_after_rotation(store: EventStore) -> None:
    subject = uuid.uuid4()
    old = await store.keyring.keys_for_write([subject])
    rotated = (MasterKey("next", os.urandom(32)), *store.settings.master_keys)
    ring = KeyRing(store.pool, rotated)
    again = await ring.keys_for_read([subject])
    assert roundtrip(old[subject], again[subject], subject) == "hello"
    fresh = uuid.uuid4()
    await ring.keys_for_write([fresh])
    async with store.pool.acquire() as conn:
        kid = await conn.fetchval("SELECT master_key_id FROM data_keys WHERE subject=$1", fresh)
    assert kid == "next", "new keys are wrapped by the first (current) master key"


async def test_a_wrong_master_key_is_reported_not_misread(store: EventStore) -> None:
    subject = uuid.uuid4()
    await store.keyring.keys_for_write([subject])
    wrong = KeyRing(store.pool, (MasterKey(store.settings.master_key.key_id, os.urandom(32)),))
    with pytest.raises(KeyStoreUnavailable, match="does not unwrap"):
        await wrong.keys_for_read([subject])


async def test_erasure_is_final(store: EventStore) -> None:
    """An erased subject reads as erased, cannot get a new key, and erasing again is harmless."""
    subject = uuid.uuid4()
    key = (await store.keyring.keys_for_write([subject]))[subject]
    assert await store.keyring.erase(subject) is True
    assert await store.keyring.erase(subject) is False
    ring = KeyRing(store.pool, store.settings.master_keys)
    assert (await ring.keys_for_read([subject]))[subject] is None
    assert roundtrip(key, None, subject) is ERASED
    with pytest.raises(SubjectErased):
        await ring.keys_for_write([subject])
    assert await ring.is_erased(subject)


async def test_a_subject_erased_before_any_key_can_never_get_one(store: EventStore) -> None:
    subject = uuid.uuid4()
    assert await store.keyring.erase(subject) is False
    with pytest.raises(SubjectErased):
        await KeyRing(store.pool, store.settings.master_keys).keys_for_write([subject])


def test_master_key_format_matches_settings(base_settings: Settings) -> None:
    """The local stack's key is a valid 32-byte AES key with an id."""
    key = base_settings.master_key
    assert len(key.key) == 32
    assert key.key_id


def _nonce_of(sealed: str) -> bytes:
    return sealed_bytes(sealed)[16:28]


def test_no_two_seals_share_a_nonce_not_even_across_a_fork() -> None:
    """Nonces are cut from a buffer of CSPRNG bytes: thousands of seals never repeat one, and a
    child forked with a half-used buffer does not hand out the parent's next nonces."""
    key, subject, event = AESGCM(AESGCM.generate_key(256)), uuid.uuid4(), uuid.uuid4()
    nonces = {_nonce_of(seal(key, subject, event, "same words")) for _ in range(5000)}
    assert len(nonces) == 5000
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read_end)
        os.write(write_end, b"".join(_nonce_of(seal(key, subject, event, "x")) for _ in range(8)))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        from_child = pipe.read()
    os.waitpid(child, 0)
    from_parent = b"".join(_nonce_of(seal(key, subject, event, "x")) for _ in range(8))
    assert len(from_child) == len(from_parent) == 8 * 12
    child_nonces = {from_child[i : i + 12] for i in range(0, len(from_child), 12)}
    parent_nonces = {from_parent[i : i + 12] for i in range(0, len(from_parent), 12)}
    assert not child_nonces & (parent_nonces | nonces)


def test_a_sealed_value_is_canonical_base64_and_anything_else_is_refused() -> None:
    """Seals are standard base64 (padded, no line breaks) after ``pd1:``; reading one accepts
    that alphabet only: a wrong character, broken or excess padding, a line break, a non-ASCII
    character, no prefix or too few bytes is a :class:`DecodeError`, never a misread."""
    key, subject, event = AESGCM(AESGCM.generate_key(256)), uuid.uuid4(), uuid.uuid4()
    sealed = seal(key, subject, event, "naïve café " * 40)
    body = sealed.removeprefix("pd1:")
    assert sealed.startswith("pd1:")
    assert base64.b64encode(base64.b64decode(body, validate=True)).decode() == body
    assert sealed_bytes(sealed)[:16] == subject.bytes
    assert unseal({subject: key}, event, sealed) == "naïve café " * 40
    damaged = [
        body,  # no prefix
        "pd1:" + body[:-4] + "!" + body[-3:],
        "pd1:" + body[:-1],  # padding cut
        "pd1:" + body + "=",  # excess padding
        "pd1:" + body[:8] + "\n" + body[8:],
        "pd1:" + body[:8] + "é" + body[9:],
        "pd1:" + base64.b64encode(bytes(40)).decode(),  # too short for subject, nonce and tag
    ]
    for value in damaged:
        with pytest.raises(DecodeError):
            sealed_bytes(value)


async def test_a_lost_listener_resubscribes_and_erasures_elsewhere_are_still_heard(
    store: EventStore,
) -> None:
    """The listening connection is killed (a PostgreSQL restart, a dropped connection): the
    ring subscribes again, and an erasure made elsewhere afterwards still evicts the key, so
    nothing new is sealed with it."""
    subject = uuid.uuid4()
    async with KeyRing(store.pool, store.settings.master_keys) as ring:
        await ring.keys_for_write([subject])
        assert ring.cached_write_key(subject) is not None
        subscribed, pid = ring.subscriptions, ring.listener_pid
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        async with asyncio.timeout(10):
            await ring.wait_subscribed(subscribed + 1)
        assert ring.listener_pid not in (None, pid)
        await ring.keys_for_write([subject])
        assert ring.cached_write_key(subject) is not None, "listening again: keys are cached"
        heard = ring.notices
        await store.keyring.erase(subject)  # another ring: the erasure reaches us by NOTIFY only
        async with asyncio.timeout(10):
            await ring.wait_notices(heard + 1)
        assert ring.cached_write_key(subject) is None
        with pytest.raises(SubjectErased):
            await ring.keys_for_write([subject])
        assert (await ring.keys_for_read([subject]))[subject] is None


async def test_an_erasure_heard_during_a_key_read_keeps_the_key_out_of_the_cache(
    store: EventStore,
) -> None:
    """The notice of an erasure committed after a ring read a key, but heard before the read
    finished (here: while the pool resets the connection), finds nothing to forget: the ring
    must not cache the key it read."""
    subject = uuid.uuid4()
    await store.keyring.keys_for_write([subject])
    armed = False

    async def reset(conn: asyncpg.Connection) -> None:
        nonlocal armed
        if armed:
            armed = False
            heard = ring.notices
            await store.keyring.erase(subject)
            async with asyncio.timeout(10):
                await ring.wait_notices(heard + 1)
        await conn.reset()

    pool = await asyncpg.create_pool(
        store.settings.postgres_dsn, min_size=1, max_size=3, reset=reset
    )
    try:
        async with KeyRing(pool, store.settings.master_keys) as ring:
            armed = True
            read = await ring.keys_for_read([subject])
            assert read[subject] is not None, "read before the erasure committed"
            assert not armed
            assert ring.cached_write_key(subject) is None
            assert (await ring.keys_for_read([subject]))[subject] is None
            with pytest.raises(SubjectErased):
                await ring.keys_for_write([subject])
    finally:
        await pool.close()


async def test_a_ring_that_does_not_listen_caches_nothing(store: EventStore) -> None:
    """Without a listener an erasure elsewhere would go unheard: every lookup asks PostgreSQL."""
    subject = uuid.uuid4()
    ring = KeyRing(store.pool, store.settings.master_keys)
    await ring.keys_for_write([subject])
    assert ring.cached_write_key(subject) is None
    await store.keyring.erase(subject)
    with pytest.raises(SubjectErased):
        await ring.keys_for_write([subject])
