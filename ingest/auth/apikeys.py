"""API keys for service clients (``X-API-Key``): shown once, stored hashed, scoped, revocable.

A key reads ``bbk_<key_id>_<secret>``: ``key_id`` is 16 hex digits that find the row,
``secret`` 256 random bits. Only SHA-256 of the secret is stored. A slow hash would add
nothing here: unlike a password, the secret is uniformly random and cannot be guessed
from a list, and SHA-256 keeps verification cheap on the hot path. The stored and computed
digests are compared in constant time.

Scopes (a key acts for its owner, within them):

- ``messages:write`` -- send, edit, delete messages; reactions; read markers
- ``conversations:write`` -- create conversations, manage members and roles
- ``read`` -- every read endpoint

``last_used_at`` is written at most once per ``touch_interval`` per key, so busy keys do not
turn every request into a row update.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec
import structlog

from eventstore import Pool
from ingest.auth.errors import InvalidApiKey, InvalidScope
from ingest.auth.metrics import AUTH_FAILURES

SCOPES: Final = frozenset({"messages:write", "conversations:write", "read"})
KEY_PREFIX: Final = "bbk"
_PRESENTED = re.compile(r"^bbk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")

log = structlog.get_logger(__name__)


class ApiKey(msgspec.Struct, frozen=True):
    """A verified key: who it acts for and what it may do."""

    key_id: str
    owner_id: uuid.UUID
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


class ApiKeys:
    """API keys in ``ingest.api_keys``. The pool is owned by the caller."""

    def __init__(
        self,
        pool: Pool,
        *,
        touch_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self.touch_interval = touch_interval
        self._clock = clock

    async def create(
        self, owner_id: uuid.UUID, scopes: Iterable[str], name: str
    ) -> tuple[str, str]:
        """A new key for ``owner_id``: ``(key_id, presented key)``. The key is never shown again."""
        wanted = sorted(set(scopes))
        for scope in wanted:
            if scope not in SCOPES:
                raise InvalidScope(scope)
        if not wanted:
            raise InvalidScope("")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        await self._pool.execute(
            "INSERT INTO ingest.api_keys "
            "(key_id, owner_id, name, scopes, secret_hash, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            key_id,
            owner_id,
            name,
            wanted,
            _digest(secret),
            datetime.fromtimestamp(self._clock(), UTC),
        )
        log.info("auth.api_key_created", key_id=key_id, owner_id=str(owner_id), scopes=wanted)
        return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"

    async def verify(self, presented: str) -> ApiKey:
        """The key ``presented`` stands for, or :class:`InvalidApiKey` naming why not."""
        try:
            return await self._verify(presented)
        except InvalidApiKey as exc:
            AUTH_FAILURES.labels("api_key", exc.reason).inc()
            log.info("auth.api_key_refused", reason=exc.reason)
            raise

    async def _verify(self, presented: str) -> ApiKey:
        match = _PRESENTED.match(presented)
        if match is None:
            raise InvalidApiKey("malformed")
        key_id, secret = match.groups()
        row = await self._pool.fetchrow(
            "SELECT owner_id, name, scopes, secret_hash, revoked_at, last_used_at "
            "FROM ingest.api_keys WHERE key_id = $1",
            key_id,
        )
        if row is None:
            raise InvalidApiKey("unknown")
        if not hmac.compare_digest(row["secret_hash"], _digest(secret)):
            raise InvalidApiKey("mismatch")
        if row["revoked_at"] is not None:
            raise InvalidApiKey("revoked")
        now = datetime.fromtimestamp(self._clock(), UTC)
        last_used = row["last_used_at"]
        if last_used is None or now - last_used >= timedelta(seconds=self.touch_interval):
            await self._pool.execute(
                "UPDATE ingest.api_keys SET last_used_at = $2 WHERE key_id = $1", key_id, now
            )
        return ApiKey(key_id, row["owner_id"], row["name"], frozenset(row["scopes"]))

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key at once (an operator's act); False if unknown or already revoked."""
        return await self._revoke(key_id, None)

    async def revoke_owned(self, key_id: str, owner_id: uuid.UUID) -> bool:
        """Revoke a key of ``owner_id``'s; False if it is not theirs, unknown or revoked."""
        return await self._revoke(key_id, owner_id)

    async def revoke_owner(self, owner_id: uuid.UUID) -> int:
        """Revoke every key of ``owner_id`` (erasure, a suspended account); how many."""
        rows = await self._pool.fetch(
            "UPDATE ingest.api_keys SET revoked_at = $2 WHERE owner_id = $1 "
            "AND revoked_at IS NULL RETURNING key_id",
            owner_id,
            datetime.fromtimestamp(self._clock(), UTC),
        )
        for row in rows:
            log.info("auth.api_key_revoked", key_id=row["key_id"])
        return len(rows)

    async def _revoke(self, key_id: str, owner_id: uuid.UUID | None) -> bool:
        status = await self._pool.execute(
            "UPDATE ingest.api_keys SET revoked_at = $2 WHERE key_id = $1 "
            "AND ($3::uuid IS NULL OR owner_id = $3) AND revoked_at IS NULL",
            key_id,
            datetime.fromtimestamp(self._clock(), UTC),
            owner_id,
        )
        revoked = status == "UPDATE 1"
        if revoked:
            log.info("auth.api_key_revoked", key_id=key_id)
        return revoked
