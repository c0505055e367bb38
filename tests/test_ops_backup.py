"""``backbone backup`` / ``restore``: the key store and ingest's records survive a lost database."""

from __future__ import annotations

import msgspec
import pytest

from eventstore import MasterKey, create_pool
from ops.backup import BackupError, open_backup, restore_backup, seal_backup, take_backup
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
