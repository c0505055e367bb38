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

**Restoring** must not bring back a person erased after the backup was taken (the backup
still holds their key, account, sessions and API keys). So it first reads every erasure the
log records (``UserErased``), and refuses, restoring nothing, when the log cannot say: Kafka
unreachable, the deployment's user topic missing, or empty while the backup holds accounts
(Kafka was lost too: restore the log first, see ``docs/operations.md``). Then the erased
subjects' keys are destroyed (:meth:`~eventstore.KeyRing.erase`; the backup's key is then
never inserted), and one transaction loads the tables (rows already present are kept) and
re-applies every other step of each erasure that concerns restored state, through the same
code as the API's erasure (:func:`ingest.erasure.release_user`): a failure restores nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio import Redis
from redis.exceptions import RedisError

from eventstore import (
    Connection,
    EventStore,
    EventStoreError,
    MasterKey,
    Pool,
    RecordedEvent,
    Settings,
    TopicLayout,
    create_pool,
)
from eventstore.epoch import epoch_channel
from ingest.auth.tokens import load_jwt_keys, new_jwt_key, parse_jwt_keys
from ingest.config import load_ingest_config
from ingest.erasure import release_user
from ingest.security import AuthService
from ops.deployment import command_settings
from ops.provision import migrate_all
from ops.restore_log import existing_partitions
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


class LogNotRestored(BackupError):
    """The log cannot say who was erased after the backup: the restore refuses."""


RESTORE_LOG_FIRST: Final = (
    "Nothing was restored. If Kafka was lost too, restore the log first "
    "(`backbone provision`, then `backbone restore-log --from s3`), then rerun "
    "`backbone restore FILE --log-restored` (see docs/operations.md)"
)


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


async def restore_backup(
    settings: Settings, document: dict[str, Any], *, log_restored: bool = False
) -> dict[str, int]:
    """Load the backup into ``settings``' database, re-applying the log's erasures with it.

    ``log_restored``: the log was restored (``restore-log``) into this deployment before this
    restore, so the database's epoch says nothing about the clients' cursors: the restored
    epoch is moved past the backup's and announced.
    """
    await migrate_all(settings.postgres_dsn)
    async with await EventStore.open(settings, with_producer=False, migrate=False) as store:
        erased = await logged_erasures(store, bool(document["tables"].get("ingest.accounts")))
        redis = Redis.from_url(settings.redis_url)
        try:
            # Destroyed first, the keys stay destroyed: the load keeps the rows present.
            for user_id in erased:
                await store.keyring.erase(user_id)
            async with store.pool.acquire() as conn, conn.transaction():
                restored = await _load(conn, document, log_restored=log_restored)
                await reapply_erasures(_on(conn, store), redis, erased)
                epoch = await conn.fetchval("SELECT epoch FROM log_meta")
            if log_restored:
                await redis.publish(
                    epoch_channel(settings.topic_prefix), json.dumps({"epoch": epoch})
                )
        finally:
            await redis.aclose()
    restored["erasures_reapplied"] = len(erased)
    return restored


async def _load(
    conn: Connection, document: dict[str, Any], *, log_restored: bool
) -> dict[str, int]:
    restored: dict[str, int] = {}
    for table in TABLES:
        rows = document["tables"].get(table, [])
        if table == "log_meta":
            # The epoch only moves forward: never restore an older one over a newer. After
            # a log restore it moves past the backup's: the clients' cursors are of the old log.
            for row in rows:
                await conn.execute(
                    "UPDATE log_meta SET epoch = greatest(epoch, $1)",
                    row["epoch"] + 1 if log_restored else row["epoch"],
                )
            restored[table] = len(rows)
            continue
        insert = (
            f"INSERT INTO {table} SELECT * FROM"  # noqa: S608 - constant table names
            f" json_populate_recordset(null::{table}, $1::json) ON CONFLICT DO NOTHING"
        )
        status = await conn.execute(insert, json.dumps(rows))
        restored[table] = int(status.rsplit(" ", 1)[-1])
    return restored


async def logged_erasures(store: EventStore, expect_events: bool) -> list[uuid.UUID]:
    """Every subject the log says was erased, in log order; :class:`LogNotRestored` when the
    user topic is missing, has another partition count, or (``expect_events``) is empty."""
    layout = TopicLayout.from_settings(store.settings)
    topic = layout.topic("user")
    found = (await existing_partitions(store.settings, [topic])).get(topic)
    if found is None:
        raise LogNotRestored(
            f"the log's user topic {topic} does not exist, so erasures made after the backup "
            f"cannot be re-applied. {RESTORE_LOG_FIRST}"
        )
    if found != layout.partitions("user"):
        raise LogNotRestored(
            f"the log's user topic {topic} has {found} partitions, the deployment's layout "
            f"{layout.partitions('user')}: it is not this deployment's log. {RESTORE_LOG_FIRST}"
        )
    erased: dict[uuid.UUID, None] = {}
    async with store.reader(("user",)) as reader:
        if expect_events and not any((await reader.end_offsets()).values()):
            raise LogNotRestored(
                f"the log's user topic {topic} is empty but the backup holds accounts: it is "
                f"not the log the backup belongs to. {RESTORE_LOG_FIRST}"
            )
        async for batch in reader.batches_until_end():
            for item in batch.items:
                if isinstance(item, RecordedEvent) and isinstance(item.event, UserErased):
                    erased[item.event.user_id] = None
    return list(erased)


async def reapply_erasures(store: EventStore, redis: Redis, erased: list[uuid.UUID]) -> None:
    """Every step of each erasure that concerns restored state (all but destroying the key,
    done before, and appending ``UserErased``, in the log already): the API's own procedure."""
    settings = store.settings
    try:
        keys = load_jwt_keys()
    except EventStoreError:
        # Erasure issues no tokens: a throw-away key will do when none is configured.
        keys = parse_jwt_keys(new_jwt_key("restore"))
    auth = AuthService.build(store.pool, redis, settings, load_ingest_config(), keys)
    for user_id in erased:
        await release_user(store, auth, user_id)


class _Held:
    """A pool of one connection, in the restore's transaction (the erasure's code runs there)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        yield self._conn

    def __getattr__(self, name: str) -> Any:
        # execute, fetch, fetchrow, fetchval: asyncpg's pool and connection share them.
        return getattr(self._conn, name)


def _on(conn: Connection, store: EventStore) -> EventStore:
    """``store`` with its queries on ``conn`` (its key ring keeps its own pool)."""
    held = cast(Pool, _Held(conn))
    return EventStore(store.settings, held, store.keyring, None, store.epoch, owns_pool=False)


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
        restored = asyncio.run(restore_backup(settings, document, log_restored=args.log_restored))
    except (EventStoreError, OSError, RedisError) as exc:
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
    restore = sub.add_parser(
        "restore",
        help="restore a backup, re-applying later erasures (refused without the log)",
        description=__doc__,
    )
    restore.add_argument("file")
    restore.add_argument(
        "--log-restored",
        action="store_true",
        help="Kafka was lost too and `backbone restore-log --from s3` has restored the log "
        "into this deployment (run it first): the epoch is moved past the backup's and "
        "announced. The log is read for erasures either way",
    )
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=run_restore)
