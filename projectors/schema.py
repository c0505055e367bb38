"""The read model's tables, described once and created into any schema.

A rebuild projects the log into a *shadow* schema and swaps it in by renaming, so the DDL is
not a one-off migration of ``chat``: it is a function of the schema name. :data:`TABLES` is
the single description; the DDL, the generic set-based writes (:mod:`projectors.store`) and
the checksum (:mod:`projectors.checksum`) are all derived from it, so they cannot drift apart.
A change to the tables is a new :data:`READ_MODEL_VERSION`, built by a rebuild, never an
``ALTER`` of the live schema.

Every query of the read API is served by an index (primary keys plus :attr:`Table.indexes`):

* my conversations: ``members (user_id, conversation_id)``, then primary-key lookups of
  ``conversations``, ``read_markers`` and the last message;
* a conversation, its members: primary key ``members (conversation_id, user_id)``;
* a page of messages before/after a position: ``messages (conversation_id, "offset")``;
* reactions of a page: primary key ``reactions (message_id, ...)``;
* who may download a media object: ``messages (media_id)`` (v2; from v3 without the NULLs of
  text messages, see :attr:`Table.sparse`);
* erasure: ``messages (sender_id)``, ``conversations (creator_id)``, ``media (uploader_id)``,
  ``sessions (user_id)``;
* a person's export (:mod:`ingest.exports`): those, ``members (user_id, conversation_id)``
  (then the read markers by primary key) and ``reactions (user_id)`` (v4: the export had read
  every reaction of the deployment to find one person's).

Unread counts cost one subtraction: every message gets ``seq``, its 1-based number in its
conversation; ``conversations.message_count`` is the latest ``seq`` and a read marker stores the
``seq`` it points at, so ``unread = message_count - up_to_seq``. Sending a message moves the
sender's own marker to it (you have read what you wrote), and joining starts the marker at the
current count, so neither your own messages nor history from before you joined count as unread.
Deleted messages still count (they were delivered unread).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from typing import Final

import msgspec

from eventstore import Connection, Pool
from projectors.errors import ProjectorError, SchemaNameInvalid
from projectors.read.contract import LIVE_SCHEMA

READ_MODEL_VERSION: Final = 4
"""Recorded as the schema's comment; a rebuild compares it to decide whether to rebuild."""

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Serialises read-model creation across every projector process (value is "projchat").
_CREATE_LOCK: Final = 0x70726F6A63686174


class Column(msgspec.Struct, frozen=True, cache_hash=True):
    name: str
    type: str
    nullable: bool = False

    @property
    def sql_name(self) -> str:
        return '"offset"' if self.name == "offset" else self.name


class Table(msgspec.Struct, frozen=True, cache_hash=True):
    """One read-model table: columns in order, primary key, secondary indexes."""

    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
    unique_indexes: tuple[tuple[str, ...], ...] = ()
    sparse: tuple[str, ...] = ()
    """Nullable columns whose secondary index leaves their NULL rows out (``WHERE column IS NOT
    NULL``): every query by them looks up a value, never NULL, and PostgreSQL takes such an
    index for ``column = $1``. A message's ``media_id`` is NULL on all but media messages:
    indexing the NULLs too took a fifth of a replay's index building (0.66 s of CPU a million
    messages) and an index insertion per text message (v3)."""
    # Columns left out of the checksum: wall-clock bookkeeping that a replay cannot reproduce.
    unchecked: tuple[str, ...] = ()
    fillfactor: int = 100
    """Percent of each heap page filled by inserts. Below 100 for tables whose rows are
    rewritten over and over (a conversation's summary, a read marker: once per batch that holds
    a message of theirs): the new version then fits on the page of the old one, so the update is
    HOT and writes no index entry, and the page's dead versions are pruned in place."""

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)


def _c(name: str, type_: str, nullable: bool = False) -> Column:
    return Column(name, type_, nullable)


OFFSETS = Table(
    "offsets",
    (_c("topic", "text"), _c("partition", "integer"), _c("next_offset", "bigint")),
    ("topic", "partition"),
)
USERS = Table(
    "users",
    (
        _c("user_id", "uuid"),
        _c("username", "text", True),
        _c("display_name", "text", True),
        _c("status", "text", True),
        _c("settings", "jsonb", True),
        _c("role", "text"),
        _c("erased", "boolean"),
        _c("registered_at", "timestamptz"),
        _c("updated_at", "timestamptz"),
        _c("password_changed_at", "timestamptz", True),
    ),
    ("user_id",),
)
CONVERSATIONS = Table(
    "conversations",
    (
        _c("conversation_id", "uuid"),
        _c("kind", "text"),
        _c("name", "text", True),
        _c("description", "text", True),
        _c("creator_id", "uuid"),
        _c("created_at", "timestamptz"),
        _c("partition", "integer"),
        _c("created_offset", "bigint"),
        _c("member_count", "integer"),
        _c("message_count", "bigint"),
        _c("last_message_id", "uuid", True),
        _c("last_offset", "bigint", True),
        _c("last_activity_at", "timestamptz"),
    ),
    ("conversation_id",),
    indexes=(("creator_id",),),
    fillfactor=50,
)
MEMBERS = Table(
    "members",
    (
        _c("conversation_id", "uuid"),
        _c("user_id", "uuid"),
        _c("role", "text"),
        _c("joined_at", "timestamptz"),
    ),
    ("conversation_id", "user_id"),
    indexes=(("user_id", "conversation_id"),),
)
MESSAGES = Table(
    "messages",
    (
        _c("message_id", "uuid"),
        _c("conversation_id", "uuid"),
        _c("partition", "integer"),
        _c("offset", "bigint"),
        _c("seq", "bigint"),
        _c("sender_id", "uuid"),
        _c("client_msg_id", "text"),
        _c("kind", "text"),
        _c("body", "text", True),
        _c("reply_to", "uuid", True),
        _c("media_id", "uuid", True),
        _c("created_at", "timestamptz"),
        _c("edited_at", "timestamptz", True),
        _c("deleted", "boolean"),
        _c("deleted_at", "timestamptz", True),
        _c("deleted_by", "uuid", True),
    ),
    ("message_id",),
    indexes=(("sender_id",), ("media_id",)),
    unique_indexes=(("conversation_id", "offset"),),
    sparse=("media_id",),
)
REACTIONS = Table(
    "reactions",
    (
        _c("message_id", "uuid"),
        _c("user_id", "uuid"),
        _c("emoji", "text"),
        _c("conversation_id", "uuid"),
        _c("reacted_at", "timestamptz"),
    ),
    ("message_id", "user_id", "emoji"),
    indexes=(("user_id",),),
)
READ_MARKERS = Table(
    "read_markers",
    (
        _c("conversation_id", "uuid"),
        _c("user_id", "uuid"),
        _c("up_to", "uuid", True),
        _c("up_to_offset", "bigint", True),
        _c("up_to_seq", "bigint"),
        _c("moved_at", "timestamptz"),
    ),
    ("conversation_id", "user_id"),
    fillfactor=50,
)
MEDIA = Table(
    "media",
    (
        _c("media_id", "uuid"),
        _c("uploader_id", "uuid"),
        _c("content_type", "text"),
        _c("size", "bigint"),
        _c("sha256", "text"),
        _c("filename", "text", True),
        _c("uploaded_at", "timestamptz"),
    ),
    ("media_id",),
    indexes=(("uploader_id",),),
)
SESSIONS = Table(
    "sessions",
    (
        _c("session_id", "uuid"),
        _c("user_id", "uuid"),
        _c("device", "text", True),
        _c("started_at", "timestamptz"),
        _c("expires_at", "timestamptz"),
        _c("revoked_at", "timestamptz", True),
        _c("revoke_reason", "text", True),
    ),
    ("session_id",),
    indexes=(("user_id",),),
)
DEAD_LETTERS = Table(
    "dead_letters",
    (
        _c("topic", "text"),
        _c("partition", "integer"),
        _c("offset", "bigint"),
        _c("position", "text"),
        _c("type", "text"),
        _c("reason", "text"),
        _c("error", "text"),
        _c("payload", "bytea", True),
        _c("headers", "jsonb"),
        _c("failed_at", "timestamptz"),
        _c("retried_at", "timestamptz", True),
        _c("resolved", "boolean"),
    ),
    ("topic", "partition", "offset"),
    # `position` repeats topic/partition/offset with the epoch, which a log restore changes.
    unchecked=("failed_at", "retried_at", "position"),
)

TABLES: Final = (
    OFFSETS,
    USERS,
    CONVERSATIONS,
    MEMBERS,
    MESSAGES,
    REACTIONS,
    READ_MARKERS,
    MEDIA,
    SESSIONS,
    DEAD_LETTERS,
)


def checked_schema_name(schema: str) -> str:
    """``schema`` if it is a plain lower-case identifier (safe to splice into SQL)."""
    if not _SCHEMA_NAME.match(schema):
        raise SchemaNameInvalid(f"not a plain lower-case identifier: {schema!r}")
    return schema


def in_schema(schema: str, sql: str) -> str:
    """``sql`` with ``{schema}`` replaced by the checked name: the one place names are spliced."""
    return sql.replace("{schema}", checked_schema_name(schema))


def _columns(names: tuple[str, ...]) -> str:
    return ", ".join('"offset"' if n == "offset" else n for n in names)


def index_ddl(schema: str, table: Table) -> list[str]:
    """``CREATE INDEX`` statements of ``table``'s secondary indexes in ``schema``. Idempotent:
    an index already there is left as it is."""
    schema = checked_schema_name(schema)
    statements = []
    for unique, groups in ((False, table.indexes), (True, table.unique_indexes)):
        for cols_ in groups:
            name = f"{table.name}_by_{'_'.join(cols_)}"
            kind = "UNIQUE INDEX" if unique else "INDEX"
            where = f" WHERE {cols_[0]} IS NOT NULL" if cols_[0] in table.sparse else ""
            statements.append(
                f"CREATE {kind} IF NOT EXISTS {name} ON {schema}.{table.name} "
                f"({_columns(cols_)}){where}"
            )
    return statements


def table_ddl(schema: str, table: Table, *, build: bool = False) -> list[str]:
    """``CREATE TABLE`` and ``CREATE INDEX`` statements of one table in ``schema`` (``build``:
    its primary key only)."""
    schema = checked_schema_name(schema)
    cols = [f"{c.sql_name} {c.type}{'' if c.nullable else ' NOT NULL'}" for c in table.columns]
    cols.append(f"PRIMARY KEY ({_columns(table.primary_key)})")
    storage = f" WITH (fillfactor = {table.fillfactor})" if table.fillfactor < 100 else ""
    statements = [
        f"CREATE TABLE {schema}.{table.name} (\n    " + ",\n    ".join(cols) + f"\n){storage}"
    ]
    return statements if build else statements + index_ddl(schema, table)


def schema_ddl(schema: str, *, build: bool = False) -> list[str]:
    """Every statement that creates the read model in a new schema ``schema`` (``build``: for
    a build, its secondary indexes left out and its erasures deferred; see
    :func:`create_schema`)."""
    schema = checked_schema_name(schema)
    statements = [f"CREATE SCHEMA {schema}"]
    for table in TABLES:
        statements.extend(table_ddl(schema, table, build=build))
    if build:
        statements.append(in_schema(schema, _PENDING_ERASURES_DDL))
    statements.append(f"COMMENT ON SCHEMA {schema} IS 'backbone read model v{READ_MODEL_VERSION}'")
    return statements


async def schema_exists(conn: Connection | Pool, schema: str) -> bool:
    found = await conn.fetchval(
        "SELECT true FROM pg_namespace WHERE nspname = $1", checked_schema_name(schema)
    )
    return bool(found)


async def create_schema(conn: Connection, schema: str, *, build: bool = False) -> bool:
    """Create the read model in ``schema`` unless it exists; return whether it was created.

    Idempotent and safe from many processes at once: creation runs in one transaction under
    an advisory lock, so a schema is either absent or complete.

    ``build``: a schema that a replay fills before anyone reads it gets its primary keys only;
    :func:`finish_build` adds the secondary indexes once the rows are in. Each secondary index
    costs every row written a B-tree insertion at a random place; one sorted build at the end
    costs a fraction of that (a million messages: about 5 µs a row less, most of PostgreSQL's
    share of a replay). Erasure finds a person's rows by those indexes, so a build records its
    erasures instead (:func:`defer_erasures`) and :func:`finish_build` applies them.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK)
        if await schema_exists(conn, schema):
            return False
        for statement in schema_ddl(schema, build=build):
            await conn.execute(statement)
    return True


ERASE_SQL: Final = (
    "UPDATE {schema}.messages SET body = NULL WHERE sender_id = $1 AND body IS NOT NULL",
    "UPDATE {schema}.conversations SET name = NULL, description = NULL "
    "WHERE creator_id = $1 AND (name IS NOT NULL OR description IS NOT NULL)",
    "UPDATE {schema}.media SET filename = NULL WHERE uploader_id = $1 AND filename IS NOT NULL",
    "UPDATE {schema}.sessions SET device = NULL WHERE user_id = $1 AND device IS NOT NULL",
)
"""Erasing a person ($1): every personal value of theirs in the tables, redacted set-wise by
the secondary indexes on their columns (the users row is the projection's)."""


async def redact(conn: Connection, schema: str, user_id: uuid.UUID) -> None:
    """Run :data:`ERASE_SQL` for ``user_id`` in ``schema``."""
    for sql in ERASE_SQL:
        await conn.execute(in_schema(schema, sql), user_id)


_PENDING_ERASURES_DDL: Final = "CREATE TABLE {schema}.pending_erasures (user_id uuid PRIMARY KEY)"
_PENDING_EXISTS_SQL: Final = "SELECT to_regclass($1)"
_PENDING_SQL: Final = "SELECT user_id FROM {schema}.pending_erasures ORDER BY user_id"
_DEFER_SQL: Final = (
    "INSERT INTO {schema}.pending_erasures (user_id) VALUES ($1) ON CONFLICT DO NOTHING"
)


def _pending(schema: str) -> str:
    return f"{checked_schema_name(schema)}.pending_erasures"


async def defer_erasures(conn: Connection, schema: str, users: Sequence[uuid.UUID]) -> bool:
    """Record the erasures of ``users`` for :func:`finish_build` if ``schema`` is a build it
    has not finished (whose tables lack the indexes erasure finds rows by: each would read the
    whole messages table); whether it did. Deferring changes no outcome for a log ingest
    writes: the table is read by no one before the build is finished, and erasure's
    redactions commute with every later write of the build (a person's values written after
    their erasure are sealed under the key it destroyed, and decode as erased; only a
    message's sender may edit it). In a log where someone else edited a message after its
    sender's erasure (ingest refuses that edit), the deferred redaction blanks that edit too,
    where one applied at once would leave it; across partitions a parallel build never fixed
    that order anyway. The records commit with the batch, so a build that dies keeps them."""
    if await conn.fetchval(_PENDING_EXISTS_SQL, _pending(schema)) is None:
        return False
    await conn.executemany(in_schema(schema, _DEFER_SQL), [(user,) for user in users])
    return True


_INDEX_BUILD_MEMORY: Final = "512MB"
"""``maintenance_work_mem`` of each session that builds a deferred index: a sort of a
million keys in memory instead of on disk."""


async def finish_build(pool: Pool, schema: str) -> None:
    """Create every index of ``schema`` that is not there yet (those a build left out), then
    apply the erasures the build deferred (:func:`defer_erasures`), in one transaction that
    also drops their record.

    Idempotent: a build resumed after a crash, or one that never left anything out, gets only
    what is missing. The statements run side by side, each on a connection of its own and
    outside any transaction block, so a crash part-way keeps the indexes already built.
    PostgreSQL builds one index in one process (with parallel workers for part of a large
    table's scan), so one after the other the builds left cores idle. On this two-core machine
    the gain is small: a million messages' indexes took 0.79 s against 0.93-1.5 s on their own,
    0.91-0.96 against 0.98-1.10 s at the end of a replay; a database server with more cores
    gains more.
    """

    async def build(statement: str) -> None:
        async with pool.acquire() as conn:
            await conn.execute(f"SET maintenance_work_mem TO '{_INDEX_BUILD_MEMORY}'")
            try:
                await conn.execute(statement)
            finally:
                await conn.execute("RESET maintenance_work_mem")

    async with asyncio.TaskGroup() as builds:
        for table in TABLES:
            for statement in index_ddl(schema, table):
                builds.create_task(build(statement))
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(_PENDING_EXISTS_SQL, _pending(schema)) is None:
            return  # finished before (a resumed build), or never a build
        for (user_id,) in await conn.fetch(in_schema(schema, _PENDING_SQL)):
            await redact(conn, schema, user_id)
        await conn.execute(in_schema(schema, "DROP TABLE {schema}.pending_erasures"))


async def require_live_schema(conn: Connection | Pool) -> None:
    """Raise :class:`ProjectorError` unless the live read model exists (an operator command
    that reads or writes it, before ``backbone provision``)."""
    if not await schema_exists(conn, LIVE_SCHEMA):
        raise ProjectorError(f"no read model in schema {LIVE_SCHEMA!r}; run `backbone provision`")


async def ensure_live_schema(pool: Pool) -> bool:
    """Create the live read model (:data:`LIVE_SCHEMA`) if absent; what start-up runs."""
    async with pool.acquire() as conn:
        return await create_schema(conn, LIVE_SCHEMA)
