"""Sessions and refresh tokens: durable in PostgreSQL, hot in Redis, revocable at once.

A login opens a session (``ingest.sessions``) and hands out a pair: a short-lived access JWT
naming the session (``sid``) and an opaque refresh token. Refresh tokens are 256-bit random
strings stored only as SHA-256 digests; each is good for one use. Refreshing spends the
presented token and returns a new pair. A spent token presented again means two parties hold
the same token -- one of them stole it -- so the whole session is revoked and both must log
in again (OAuth 2.0 Security BCP, refresh token rotation). Concurrent refreshes of one
session serialise on the session row, so exactly one wins.

Expiry is absolute twice over: a session ends ``session_ttl`` after login whatever happens;
a refresh token expires ``refresh_ttl`` after it was issued (an idle session dies sooner).

**Hot path.** :meth:`SessionStore.is_session_active` reads ``<namespace>:session:<id>`` from
Redis: ``"1"`` active, ``"0"`` revoked. On a miss (the key expired, or Redis lost its data)
PostgreSQL answers and the answer is cached again, so losing Redis never resurrects a revoked
session. An active entry is written with ``NX`` and never outlives the session; a revocation
overwrites it. Revocation writes Redis *before* committing PostgreSQL: if the commit then
fails the session is refused until the cache entry expires (fail closed), while the other
order could leave a revoked session cached as active.

**Revocation feed.** Every revocation is PUBLISHed on ``<namespace>:revocations`` as JSON
``{"session_id": ..., "user_id": ..., "reason": ...}`` so the fanout tier closes the
session's sockets. It is sent in the same Redis transaction as the cache update.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec
import structlog
from redis.asyncio import Redis

from eventstore import Connection, Pool
from ingest.auth.errors import InvalidRefreshToken, InvalidToken, RefreshTokenReused
from ingest.auth.metrics import AUTH_FAILURES, SESSIONS_REVOKED
from ingest.auth.tokens import AccessClaims, AccessTokens

RevocationReason = Literal["logout", "refresh_reuse", "password_change", "erasure", "admin"]

DEFAULT_SESSION_TTL: Final = 30 * 24 * 3600
DEFAULT_REFRESH_TTL: Final = 7 * 24 * 3600
DEFAULT_CACHE_TTL: Final = 3600
"""Bound on how long Redis answers for a session without asking PostgreSQL again."""
_MAX_REFRESH_TOKEN: Final = 128
"""Longer input is refused unhashed: a real refresh token is 43 characters."""
_ACTIVE, _REVOKED = "1", "0"

log = structlog.get_logger(__name__)


class TokenPair(msgspec.Struct, frozen=True, kw_only=True):
    """What a login or a refresh answers (``expires_in``: seconds the access token lives)."""

    access_token: str
    refresh_token: str
    expires_in: int
    session_id: uuid.UUID
    user_id: uuid.UUID
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type, not a secret


class Revocation(msgspec.Struct, frozen=True):
    """The message published on ``<namespace>:revocations``."""

    session_id: uuid.UUID
    user_id: uuid.UUID
    reason: str


_encode_revocation = msgspec.json.Encoder().encode


def _digest(refresh_token: str) -> bytes:
    return hashlib.sha256(refresh_token.encode("utf-8")).digest()


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class SessionStore:
    """Sessions of one deployment. ``namespace`` prefixes its Redis keys (the topic prefix).

    The pool and the Redis client are owned by the caller. Either Redis response mode
    (bytes or ``decode_responses=True``) works.
    """

    def __init__(
        self,
        pool: Pool,
        redis: Redis,
        tokens: AccessTokens,
        *,
        namespace: str,
        session_ttl: int = DEFAULT_SESSION_TTL,
        refresh_ttl: int = DEFAULT_REFRESH_TTL,
        cache_ttl: int = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if min(session_ttl, refresh_ttl, cache_ttl) <= 0:
            raise ValueError("session, refresh and cache lifetimes must be positive")
        self._pool = pool
        self._redis = redis
        self.tokens = tokens
        self.namespace = namespace
        self.session_ttl = session_ttl
        self.refresh_ttl = refresh_ttl
        self.cache_ttl = cache_ttl
        self._clock = clock

    @property
    def revocations_channel(self) -> str:
        return f"{self.namespace}:revocations"

    def cache_key(self, session_id: uuid.UUID) -> str:
        """The Redis key caching ``session_id``'s state (for callers that pipeline the read)."""
        return self._key(session_id)

    async def is_active_cached(self, session_id: uuid.UUID, cached: bytes | str | None) -> bool:
        """:meth:`is_session_active`, given the cache entry the caller already read."""
        if cached is not None:
            return cached in (_ACTIVE, _ACTIVE.encode())
        return await self.is_session_active(session_id)

    def _key(self, session_id: uuid.UUID) -> str:
        return f"{self.namespace}:session:{session_id}"

    async def create(self, user_id: uuid.UUID) -> TokenPair:
        """Open a session for ``user_id`` (after a successful login) and return its first pair."""
        now = self._clock()
        session_id = uuid.uuid4()
        expires = now + self.session_ttl
        refresh_token = secrets.token_urlsafe(32)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO ingest.sessions (session_id, user_id, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4)",
                session_id,
                user_id,
                _utc(now),
                _utc(expires),
            )
            await self._insert_refresh_token(conn, refresh_token, session_id, now, expires)
        await self._redis.set(
            self._key(session_id), _ACTIVE, px=self._active_px(now, expires), nx=True
        )
        log.info("auth.session_created", user_id=str(user_id), session_id=str(session_id))
        return self._pair(user_id, session_id, refresh_token)

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Spend ``refresh_token`` and return a new pair for its session.

        Raises :class:`RefreshTokenReused` (and revokes the session) for a spent token, and
        :class:`InvalidRefreshToken` for an unknown or expired one or an ended session.
        """
        if not refresh_token or len(refresh_token) > _MAX_REFRESH_TOKEN:
            raise self._refused("unknown")
        digest = _digest(refresh_token)
        now = self._clock()
        fresh = secrets.token_urlsafe(32)
        async with self._pool.acquire() as conn, conn.transaction():
            # Lock the session row, then read the token in a new statement (a new snapshot
            # under READ COMMITTED): every refresh and revocation of one session serialises
            # on that row, and a refresh that waited sees what the one before it spent.
            session = await conn.fetchrow(
                "SELECT session_id, user_id, expires_at, revoked_at FROM ingest.sessions "
                "WHERE session_id = (SELECT session_id FROM ingest.refresh_tokens "
                "WHERE token_hash = $1) FOR UPDATE",
                digest,
            )
            token = await conn.fetchrow(
                "SELECT expires_at, spent_at FROM ingest.refresh_tokens WHERE token_hash = $1",
                digest,
            )
            if session is None or token is None:
                outcome = "unknown"
            elif session["revoked_at"] is not None:
                outcome = "revoked"
            elif token["spent_at"] is not None:
                outcome = "reused"
            elif min(token["expires_at"], session["expires_at"]) <= _utc(now):
                outcome = "expired"
            else:
                outcome = "ok"
                await conn.execute(
                    "UPDATE ingest.refresh_tokens SET spent_at = $2 WHERE token_hash = $1",
                    digest,
                    _utc(now),
                )
                await self._insert_refresh_token(
                    conn, fresh, session["session_id"], now, session["expires_at"].timestamp()
                )
        if session is not None and outcome == "reused":
            # Two parties held this token; revoke in a transaction of its own so the
            # revocation stands whatever the caller does with the error.
            AUTH_FAILURES.labels("refresh_token", "reused").inc()
            log.warning(
                "auth.refresh_token_reused",
                session_id=str(session["session_id"]),
                user_id=str(session["user_id"]),
            )
            await self._revoke_where(
                "session_id = $1 AND revoked_at IS NULL", session["session_id"], "refresh_reuse"
            )
            raise RefreshTokenReused
        if session is None or outcome != "ok":
            raise self._refused(outcome)
        return self._pair(session["user_id"], session["session_id"], fresh)

    async def is_session_active(self, session_id: uuid.UUID) -> bool:
        """Whether ``session_id`` is live: a Redis hit normally, PostgreSQL on a miss."""
        key = self._key(session_id)
        cached = await self._redis.get(key)
        if cached is not None:
            return cached in (_ACTIVE, _ACTIVE.encode())
        row = await self._pool.fetchrow(
            "SELECT expires_at, revoked_at FROM ingest.sessions WHERE session_id = $1",
            session_id,
        )
        now = self._clock()
        if row is not None and row["revoked_at"] is None and row["expires_at"].timestamp() > now:
            # NX: a revocation that landed since the read above has already written "0".
            px = self._active_px(now, row["expires_at"].timestamp())
            await self._redis.set(key, _ACTIVE, px=px, nx=True)
            return True
        await self._redis.set(key, _REVOKED, px=self.cache_ttl * 1000)
        return False

    async def authenticate(self, access_token: str) -> AccessClaims:
        """The claims of a valid access token whose session is still active.

        Raises :class:`InvalidToken` (reason ``revoked`` when only the session check failed).
        """
        claims = self.tokens.verify(access_token)
        if not await self.is_session_active(claims.session_id):
            AUTH_FAILURES.labels("access_token", "revoked").inc()
            log.info("auth.access_token_refused", reason="revoked", user_id=str(claims.user_id))
            raise InvalidToken("revoked")
        return claims

    async def revoke(self, session_id: uuid.UUID, reason: RevocationReason) -> bool:
        """End one session at once (logout, admin). False if it had already ended."""
        return bool(
            await self._revoke_where("session_id = $1 AND revoked_at IS NULL", session_id, reason)
        )

    async def revoke_user_sessions(self, user_id: uuid.UUID, reason: RevocationReason) -> int:
        """End every live session of ``user_id`` (password change, erasure); how many ended."""
        return await self._revoke_where("user_id = $1 AND revoked_at IS NULL", user_id, reason)

    async def _revoke_where(self, where: str, value: uuid.UUID, reason: RevocationReason) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"UPDATE ingest.sessions SET revoked_at = $2, reason = $3 WHERE {where} "  # noqa: S608 - `where` is one of two literals above
                "RETURNING session_id, user_id",
                value,
                _utc(self._clock()),
                reason,
            )
            revoked = [(row["session_id"], row["user_id"]) for row in rows]
            if revoked:
                await self._cache_revoked(revoked, reason)
        self._record_revoked(revoked, reason)
        return len(revoked)

    async def _cache_revoked(
        self, revoked: Sequence[tuple[uuid.UUID, uuid.UUID]], reason: str
    ) -> None:
        """Mark sessions revoked in Redis and announce them (inside the PostgreSQL txn)."""
        pipe = self._redis.pipeline(transaction=True)
        for session_id, user_id in revoked:
            pipe.set(self._key(session_id), _REVOKED, px=self.cache_ttl * 1000)
            pipe.publish(
                self.revocations_channel,
                _encode_revocation(Revocation(session_id, user_id, reason)),
            )
        await pipe.execute()

    def _record_revoked(self, revoked: Sequence[tuple[uuid.UUID, uuid.UUID]], reason: str) -> None:
        for session_id, user_id in revoked:
            SESSIONS_REVOKED.labels(reason).inc()
            log.info(
                "auth.session_revoked",
                session_id=str(session_id),
                user_id=str(user_id),
                reason=reason,
            )

    async def _insert_refresh_token(
        self,
        conn: Connection,
        refresh_token: str,
        session_id: uuid.UUID,
        now: float,
        session_expires: float,
    ) -> None:
        await conn.execute(
            "INSERT INTO ingest.refresh_tokens (token_hash, session_id, issued_at, expires_at) "
            "VALUES ($1, $2, $3, $4)",
            _digest(refresh_token),
            session_id,
            _utc(now),
            _utc(min(now + self.refresh_ttl, session_expires)),
        )

    def _active_px(self, now: float, expires: float) -> int:
        """Milliseconds an "active" entry may live: never past the session's own end."""
        return max(1, int(min(self.cache_ttl, expires - now) * 1000))

    def _pair(self, user_id: uuid.UUID, session_id: uuid.UUID, refresh_token: str) -> TokenPair:
        return TokenPair(
            access_token=self.tokens.issue(user_id, session_id),
            refresh_token=refresh_token,
            expires_in=self.tokens.ttl,
            session_id=session_id,
            user_id=user_id,
        )

    def _refused(self, reason: str) -> InvalidRefreshToken:
        AUTH_FAILURES.labels("refresh_token", reason).inc()
        log.info("auth.refresh_token_refused", reason=reason)
        return InvalidRefreshToken(reason)
