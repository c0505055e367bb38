"""Sessions and refresh tokens: durable in PostgreSQL, hot in Redis, revocable at once.

A login opens a session (``ingest.sessions``) and hands out a pair: a short-lived access JWT
naming the session (``sid``) and an opaque refresh token. Refresh tokens are 256-bit random
strings stored only as SHA-256 digests; each is good for one use. Refreshing spends the
presented token and returns a new pair. A spent token presented again means two parties hold
the same token -- one of them stole it -- so the whole session is revoked and both must log
in again (OAuth 2.0 Security BCP, refresh token rotation). Concurrent refreshes of one
session serialise on the session row, so exactly one rotates.

**Reuse interval.** An honest client presents a spent token too: two tabs refreshing at once,
a retry after the answer was lost. So for ``reuse_interval`` seconds after a rotation (Auth0's
"reuse interval", Okta's "grace period"; 0 turns it off) the spent token is answered with its
successor -- the *same* refresh token the rotation issued, and a freshly signed access token
-- as long as that successor is still the session's unspent head; the family stays one chain.
Outside the interval, or once the successor was itself spent, it is reuse as above. The
successor is stored for this only sealed (AES-256-GCM) under a key derived from the spent
token, which the server never stores: a database leak yields no usable token. Spending the
successor clears its predecessor's sealed copy.

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
session's sockets (and ingest processes drop the user's cached API keys, see
:mod:`ingest.auth.apikeys`). It is sent in the same Redis transaction as the cache update.
API-key revocations share the channel, adding ``key_id`` (see :class:`Revocation`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, Literal

import asyncpg
import msgspec
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis

from eventstore import Connection, Pool
from ingest.auth.errors import InvalidRefreshToken, InvalidToken, RefreshTokenReused
from ingest.auth.metrics import AUTH_FAILURES, REFRESH_REPLAYS, SESSIONS_REVOKED
from ingest.auth.tokens import AccessClaims, AccessTokens

RevocationReason = Literal["logout", "refresh_reuse", "password_change", "erasure", "admin"]

DEFAULT_SESSION_TTL: Final = 30 * 24 * 3600
DEFAULT_REFRESH_TTL: Final = 7 * 24 * 3600
DEFAULT_CACHE_TTL: Final = 3600
"""Bound on how long Redis answers for a session without asking PostgreSQL again."""
DEFAULT_REUSE_INTERVAL: Final = 5.0
"""Seconds after a rotation during which the spent token is answered with its successor."""
_SEAL_CONTEXT: Final = b"backbone.refresh-successor.v1"
_NONCE: Final = 12
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


NO_SESSION: Final = uuid.UUID(int=0)
"""The ``session_id`` of a revocation that ends no session (an API key's)."""


class Revocation(msgspec.Struct, frozen=True, omit_defaults=True):
    """The message published on ``<namespace>:revocations``.

    A session's revocation is ``{"session_id", "user_id", "reason"}``. An API key's adds
    ``key_id`` and names :data:`NO_SESSION` (the nil UUID) as its session, so readers that
    predate key revocations (fanout requires a ``session_id``) still read it, and find no
    socket to close.
    """

    session_id: uuid.UUID
    user_id: uuid.UUID
    reason: str
    key_id: str | None = None


encode_revocation = msgspec.json.Encoder().encode


def _digest(refresh_token: str) -> bytes:
    return hashlib.sha256(refresh_token.encode("utf-8")).digest()


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _sealing_key(refresh_token: str) -> AESGCM:
    """A key only the holder of ``refresh_token`` can derive (the server keeps its digest).

    HMAC keyed by the token (256 random bits) with a fixed context: one block of HKDF-Expand,
    and never equal to the stored SHA-256 digest.
    """
    return AESGCM(hmac.digest(refresh_token.encode("utf-8"), _SEAL_CONTEXT, "sha256"))


def _seal(refresh_token: str, successor: str, digest: bytes) -> bytes:
    """``successor`` encrypted for whoever presents ``refresh_token`` (bound to its row)."""
    nonce = os.urandom(_NONCE)
    return nonce + _sealing_key(refresh_token).encrypt(nonce, successor.encode("ascii"), digest)


def _unseal(refresh_token: str, sealed: bytes, digest: bytes) -> str | None:
    try:
        plain = _sealing_key(refresh_token).decrypt(sealed[:_NONCE], sealed[_NONCE:], digest)
        return plain.decode("ascii")
    except (InvalidTag, ValueError):
        return None


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
        reuse_interval: float = DEFAULT_REUSE_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if min(session_ttl, refresh_ttl, cache_ttl) <= 0:
            raise ValueError("session, refresh and cache lifetimes must be positive")
        if reuse_interval < 0:
            raise ValueError("the reuse interval must not be negative")
        self._pool = pool
        self._redis = redis
        self.tokens = tokens
        self.namespace = namespace
        self.session_ttl = session_ttl
        self.refresh_ttl = refresh_ttl
        self.cache_ttl = cache_ttl
        self.reuse_interval = reuse_interval
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
        :class:`InvalidRefreshToken` for an unknown or expired one or an ended session. A token
        spent less than ``reuse_interval`` ago whose successor is still unspent is answered
        with that successor instead (see the module's docstring).
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
                "SELECT expires_at, spent_at, successor_hash, successor_sealed "
                "FROM ingest.refresh_tokens WHERE token_hash = $1",
                digest,
            )
            if session is None or token is None:
                outcome = "unknown"
            elif session["revoked_at"] is not None:
                outcome = "revoked"
            elif token["spent_at"] is not None:
                successor = await self._replayable(conn, refresh_token, digest, token, session, now)
                if successor is None:
                    outcome = "reused"
                else:
                    outcome, fresh = "replayed", successor
            elif min(token["expires_at"], session["expires_at"]) <= _utc(now):
                outcome = "expired"
            else:
                outcome = "ok"
                sealed = _seal(refresh_token, fresh, digest) if self.reuse_interval > 0 else None
                await conn.execute(
                    "UPDATE ingest.refresh_tokens SET spent_at = $2, successor_hash = $3, "
                    "successor_sealed = $4 WHERE token_hash = $1",
                    digest,
                    _utc(now),
                    _digest(fresh),
                    sealed,
                )
                # The token spent now was its predecessor's successor: that predecessor can no
                # longer be answered with it, so its sealed copy goes.
                await conn.execute(
                    "UPDATE ingest.refresh_tokens SET successor_sealed = NULL "
                    "WHERE session_id = $1 AND successor_hash = $2 "
                    "AND successor_sealed IS NOT NULL",
                    session["session_id"],
                    digest,
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
        if session is None or outcome not in ("ok", "replayed"):
            raise self._refused(outcome)
        if outcome == "replayed":
            REFRESH_REPLAYS.inc()
            log.info(
                "auth.refresh_token_replayed",
                session_id=str(session["session_id"]),
                user_id=str(session["user_id"]),
            )
        return self._pair(session["user_id"], session["session_id"], fresh)

    async def _replayable(
        self,
        conn: Connection,
        refresh_token: str,
        digest: bytes,
        token: asyncpg.Record,
        session: asyncpg.Record,
        now: float,
    ) -> str | None:
        """The successor to answer a spent token with, or None if this is reuse.

        Why the same refresh token with a *fresh* access token, rather than replaying the
        whole first answer: the refresh token must be the same (two live refresh tokens would
        fork the family), but an access token need not be stored at all -- not even sealed --
        to be answered again, so the only secret kept for the interval is the one that has to
        be. A fresh access token grants nothing the successor does not already grant (same
        session, ended by the same revocation), and outlives the first by at most the interval.
        """
        if self.reuse_interval <= 0 or token["successor_sealed"] is None:
            return None
        if now - token["spent_at"].timestamp() > self.reuse_interval:
            return None
        successor = _unseal(refresh_token, token["successor_sealed"], digest)
        if successor is None or not hmac.compare_digest(
            _digest(successor), token["successor_hash"]
        ):
            return None
        head = await conn.fetchrow(
            "SELECT expires_at, spent_at FROM ingest.refresh_tokens "
            "WHERE token_hash = $1 AND session_id = $2",
            token["successor_hash"],
            session["session_id"],
        )
        # Only while the successor is the family's unspent head: if it was spent already,
        # someone went on with it while this token came back -- that is reuse.
        if head is None or head["spent_at"] is not None:
            return None
        if min(head["expires_at"], session["expires_at"]) <= _utc(now):
            return None
        return successor

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
                encode_revocation(Revocation(session_id, user_id, reason)),
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
