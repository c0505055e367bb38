"""``backbone backup`` / ``restore``: the key store and ingest's records survive a lost database."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from eventstore import MasterKey, TopicLayout, create_pool, provision_topics
from ops.backup import (
    BackupError,
    LogNotRestored,
    open_backup,
    restore_backup,
    seal_backup,
    take_backup,
)
from tests.store_fixtures import fresh_database
from tests.system_fixtures import System


async def _rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        return [tuple(r) for r in await pool.fetch(sql)]
    finally:
        await pool.close()


async def test_restore_into_an_empty_database_reapplies_later_erasures(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    room = await api.call("POST", "/v1/conversations", token=bob.access, json={"name": "kept"})
    sent = await api.call(
        "POST",
        f"/v1/conversations/{room.body['conversation_id']}/messages",
        token=bob.access,
        json={"client_msg_id": "k1", "content": "bob's words"},
    )
    assert sent.status == 202
    key = await api.call(
        "POST", "/v1/api-keys", token=alice.access, json={"name": "bot", "scopes": ["read"]}
    )
    assert key.status == 201, key.body
    settings = system.settings
    sealed = seal_backup(await take_backup(settings), settings.master_key)

    # Alice is erased after the backup was taken.
    assert (await api.call("DELETE", "/v1/users/me", token=alice.access)).status == 202

    # The database is lost: restore into an empty one.
    target = await fresh_database(settings)
    restored = await restore_backup(target, open_backup(sealed, settings.master_keys))
    assert restored["ingest.accounts"] >= 2
    assert restored["erasures_reapplied"] >= 1

    keys_sql = "SELECT subject, wrapped, erased_at IS NOT NULL FROM data_keys ORDER BY subject"
    source_keys = {r[0]: r for r in await _rows(settings.postgres_dsn, keys_sql)}
    target_keys = {r[0]: r for r in await _rows(target.postgres_dsn, keys_sql)}
    assert target_keys[bob.user_id] == source_keys[bob.user_id]
    assert target_keys[alice.user_id][1] is None, "the erased key came back from the backup"
    assert target_keys[alice.user_id][2] is True
    accounts_sql = (
        f"SELECT user_id, password_hash, state FROM ingest.accounts WHERE user_id = '{bob.user_id}'"
    )
    assert await _rows(target.postgres_dsn, accounts_sql) == await _rows(
        settings.postgres_dsn, accounts_sql
    )
    sessions_sql = f"SELECT session_id FROM ingest.sessions WHERE user_id = '{bob.user_id}'"
    assert await _rows(target.postgres_dsn, sessions_sql)

    # Every erasure step that concerns restored state was repeated, not only the key's.
    erased_sql = (
        "SELECT state, username_lc, email_lc, password_hash FROM ingest.accounts"
        f" WHERE user_id = '{alice.user_id}'"
    )
    assert await _rows(target.postgres_dsn, erased_sql) == [("erased", None, None, None)]
    live_sql = (
        "SELECT session_id FROM ingest.sessions"
        f" WHERE user_id = '{alice.user_id}' AND revoked_at IS NULL"
    )
    assert await _rows(target.postgres_dsn, live_sql) == []
    restored_sql = f"SELECT count(*) FROM ingest.sessions WHERE user_id = '{alice.user_id}'"
    assert await _rows(target.postgres_dsn, restored_sql) == [(1,)]
    keys_live_sql = (
        "SELECT key_id FROM ingest.api_keys"
        f" WHERE owner_id = '{alice.user_id}' AND revoked_at IS NULL"
    )
    assert await _rows(target.postgres_dsn, keys_live_sql) == []
    assert await _rows(target.postgres_dsn, keys_live_sql.replace(" AND revoked_at IS NULL", ""))


_RESTORED_SQL = (
    "SELECT (SELECT count(*) FROM data_keys) + (SELECT count(*) FROM ingest.accounts)"
    " + (SELECT count(*) FROM ingest.sessions) + (SELECT count(*) FROM ingest.api_keys)"
)


async def test_a_restore_without_the_log_refuses_and_restores_nothing(system: System) -> None:
    api = system.api
    alice = await api.user()
    settings = system.settings
    sealed = seal_backup(await take_backup(settings), settings.master_key)
    assert (await api.call("DELETE", "/v1/users/me", token=alice.access)).status == 202
    document = open_backup(sealed, settings.master_keys)

    # Kafka was lost too: the deployment's user topic does not exist.
    lost = msgspec.structs.replace(
        await fresh_database(settings), topic_prefix=f"lost{uuid.uuid4().hex[:8]}"
    )
    with pytest.raises(LogNotRestored, match="restore-log"):
        await restore_backup(lost, document)
    assert await _rows(lost.postgres_dsn, _RESTORED_SQL) == [(0,)]

    # The topics were recreated but hold nothing: not the log the backup belongs to.
    await provision_topics(lost.kafka_bootstrap, TopicLayout.from_settings(lost))
    with pytest.raises(LogNotRestored, match="empty"):
        await restore_backup(lost, document)
    assert await _rows(lost.postgres_dsn, _RESTORED_SQL) == [(0,)]


def test_a_backup_is_sealed_under_the_master_key() -> None:
    key = MasterKey(key_id="k1", key=b"\x01" * 32)
    other = MasterKey(key_id="k1", key=b"\x02" * 32)
    document = {"format": "backbone-backup/1", "tables": {}, "configuration": {}}
    sealed = seal_backup(document, key)
    assert open_backup(sealed, (key,)) == document
    assert b"backbone-backup" not in sealed
    with pytest.raises(BackupError):
        open_backup(sealed, (other,))
    damaged = bytearray(sealed)
    damaged[-5] ^= 1
    with pytest.raises(BackupError):
        open_backup(bytes(damaged), (key,))
    with pytest.raises(BackupError):
        open_backup(b"not a backup", (key,))
    rotated = msgspec.structs.replace(key, key_id="k0")
    with pytest.raises(BackupError, match="not configured"):
        open_backup(seal_backup(document, rotated), (key,))
