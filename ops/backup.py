"""``backbone backup`` and ``backbone restore``: what the log cannot rebuild.

The read models and caches are rebuilt from the log (``backbone replay``). What the log does
not hold, and a disaster must not lose, is backed up here:

* the key store (``data_keys``: each data key wrapped by the master key; erased subjects as
  rows without a key) and the log epoch (``log_meta``);
* ingest's records: accounts (password hashes, never passwords), sessions, refresh-token
  digests, API-key digests, exports;
* the migration ledger and the deployment's non-secret configuration (topic layout).

The archive is JSON, gzip-compressed, then sealed with AES-256-GCM under a key derived (HKDF)
from the current master key: a backup is as hard to read as the key store itself, and is
useless without the master key (keep that in a secret store, never beside the backups).

**Restoring** loads the tables into the target database (rows already present are kept),
then re-applies every erasure the log records (``UserErased``), because a backup taken before
an erasure still holds that person's key: restoring must not bring them back.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from eventstore import (
    EventStore,
    EventStoreError,
    MasterKey,
    RecordedEvent,
    Settings,
    create_pool,
)
from ops.deployment import command_settings
from ops.provision import migrate_all
from schemas import UserErased

FORMAT: Final = "backbone-backup/1"
MAGIC: Final = b"BBK1"
TABLES: Final = (
    "schema_migrations",
    "log_meta",
    "data_keys",
    "ingest.accounts",
    "ingest.sessions",
    "ingest.refresh_tokens",
    "ingest.api_keys",
    "ingest.exports",
)
"""In restore order (references point backwards)."""


class BackupError(EventStoreError):
    """A backup cannot be read (wrong master key, damaged, not a backup)."""


def _backup_key(master: MasterKey) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"backbone backup v1").derive(
        master.key
    )


def seal_backup(document: dict[str, Any], master: MasterKey) -> bytes:
    plain = gzip.compress(json.dumps(document, separators=(",", ":")).encode(), mtime=0)
    nonce = os.urandom(12)
    key_id = master.key_id.encode()
    sealed = AESGCM(_backup_key(master)).encrypt(nonce, plain, MAGIC + key_id)
    return MAGIC + len(key_id).to_bytes(1, "big") + key_id + nonce + sealed


def open_backup(blob: bytes, masters: tuple[MasterKey, ...]) -> dict[str, Any]:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
        raise BackupError("not a backbone backup")
    size = blob[len(MAGIC)]
    start = len(MAGIC) + 1
    key_id = blob[start : start + size]
    nonce = blob[start + size : start + size + 12]
    body = blob[start + size + 12 :]
    master = next((m for m in masters if m.key_id.encode() == key_id), None)
    if master is None:
        raise BackupError(f"sealed under master key {key_id.decode()!r}, which is not configured")
    try:
        plain = AESGCM(_backup_key(master)).decrypt(nonce, body, MAGIC + key_id)
    except Exception as exc:
        raise BackupError("the backup does not authenticate (damaged, or another key)") from exc
    document: dict[str, Any] = json.loads(gzip.decompress(plain))
    if document.get("format") != FORMAT:
        raise BackupError(f"unknown backup format {document.get('format')!r}")
    return document


async def take_backup(settings: Settings) -> dict[str, Any]:
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            tables = {
                table: json.loads(
                    await conn.fetchval(
                        f"SELECT coalesce(json_agg(t), '[]') FROM {table} t"  # noqa: S608 - constant names
                    )
                )
                for table in TABLES
            }
    finally:
        await pool.close()
    return {
        "format": FORMAT,
        "taken_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "configuration": {
            "topic_prefix": settings.topic_prefix,
            "user_partitions": settings.user_partitions,
            "conversation_partitions": settings.conversation_partitions,
            "kafka_replication_factor": settings.kafka_replication_factor,
            "kafka_min_insync": settings.kafka_min_insync,
            "source": settings.source,
        },
        "tables": tables,
    }


async def restore_backup(settings: Settings, document: dict[str, Any]) -> dict[str, int]:
    """Load the backup into ``settings``' database, then re-apply the log's erasures."""
    await migrate_all(settings.postgres_dsn)
    restored: dict[str, int] = {}
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            for table in TABLES:
                rows = document["tables"].get(table, [])
                if table == "log_meta":
                    # The epoch only moves forward: never restore an older one over a newer.
                    for row in rows:
                        await conn.execute(
                            "UPDATE log_meta SET epoch = greatest(epoch, $1)", row["epoch"]
                        )
                    restored[table] = len(rows)
                    continue
                insert = (
                    f"INSERT INTO {table} SELECT * FROM"  # noqa: S608 - constant table names
                    f" json_populate_recordset(null::{table}, $1::json) ON CONFLICT DO NOTHING"
                )
                status = await conn.execute(insert, json.dumps(rows))
                restored[table] = int(status.rsplit(" ", 1)[-1])
    finally:
        await pool.close()
    restored["erasures_reapplied"] = await reapply_erasures(settings)
    return restored


async def reapply_erasures(settings: Settings) -> int:
    """Destroy again every key the log says was erased (a backup may predate the erasure)."""
    erased = 0
    store = await EventStore.open(settings, with_producer=False, migrate=False)
    async with store, store.reader(("user",)) as reader:
        async for batch in reader.batches_until_end():
            for item in batch.items:
                if isinstance(item, RecordedEvent) and isinstance(item.event, UserErased):
                    await store.keyring.erase(item.event.user_id)
                    erased += 1
    return erased


def run_backup(args: argparse.Namespace) -> int:
    settings = command_settings()
    try:
        document = asyncio.run(take_backup(settings))
    except EventStoreError as exc:
        print(f"backbone backup: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(seal_backup(document, settings.master_key))
    out.chmod(0o600)
    counts = {t: len(rows) for t, rows in document["tables"].items()}
    print(json.dumps({"file": str(out), "rows": counts}) if args.json else f"wrote {out}: {counts}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    settings = command_settings()
    try:
        document = open_backup(Path(args.file).read_bytes(), settings.master_keys)
        restored = asyncio.run(restore_backup(settings, document))
    except (EventStoreError, OSError) as exc:
        print(f"backbone restore: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(restored) if args.json else f"restored: {restored}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = sub.add_parser(
        "backup", help="back up the key store and ingest's records", description=__doc__
    )
    default = f"backups/backbone-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.bbk"
    backup.add_argument("--out", default=default, help="file to write (sealed, gzip JSON)")
    backup.add_argument("--json", action="store_true")
    backup.set_defaults(func=run_backup)
    restore = sub.add_parser("restore", help="restore a backup, re-applying later erasures")
    restore.add_argument("file")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=run_restore)
