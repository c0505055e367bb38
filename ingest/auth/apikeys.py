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

A key acts only while its owner's account is ``active``: a key of an erased (or any other
non-active) account is refused (``owner_inactive``) even if it was never revoked.

**Hot path.** A process remembers keys it verified (a bounded LRU of ``cache_size`` entries,
keyed by the SHA-256 of the presented secret, which is also what PostgreSQL stores; the secret
itself is never kept), so a busy key costs no database round trip. The cache is only used while
the process hears the revocation feed (:class:`ingest.auth.feed.RevocationFeed`):

- every revocation is published on ``<namespace>:revocations`` after its commit, as
  ``{"session_id": <nil uuid>, "user_id": <owner>, "reason": "api_key", "key_id": ...}`` (the
  nil session id keeps the message readable by consumers written for session revocations);
  every process drops that key at once. Any message naming a user (a session revoked at
  logout, password change, erasure) also drops that user's keys, so an account's change of
  state reaches the cache with its session revocations;
- a lookup overlapping a revocation is not cached (a generation counter): its answer may
  predate the commit;
- when the feed is lost or resubscribed the cache is emptied and unused until the
  subscription is confirmed again: revocations published in between were not heard;
- entries expire after ``cache_ttl`` seconds whatever happens, the bound on a lost message
  (a publish that failed after its commit, a subscription that died unnoticed).

Scopes are immutable, so a cached key carries them; the caller checks them per request.
"""

from __future__ import annotations

import collections
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
from redis.asyncio import Redis

from eventstore import Pool
from ingest.auth.errors import InvalidApiKey, InvalidScope
from ingest.auth.feed import Notice
from ingest.auth.metrics import API_KEY_CACHE, AUTH_FAILURES
from ingest.auth.sessions import NO_SESSION, Revocation, encode_revocation

SCOPES: Final = frozenset({"messages:write", "conversations:write", "read"})
KEY_PREFIX: Final = "bbk"
REVOCATION_REASON: Final = "api_key"
DEFAULT_CACHE_TTL: Final = 30.0
"""Seconds a verified key is trusted without asking PostgreSQL again (the safety net)."""
DEFAULT_CACHE_SIZE: Final = 10_000
_PRESENTED = re.compile(r"^bbk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_HIT, _MISS = API_KEY_CACHE.labels("hit"), API_KEY_CACHE.labels("miss")

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


class _Cached(msgspec.Struct):
    key: ApiKey
    expires: float


class ApiKeys:
    """API keys in ``ingest.api_keys``. The pool and the Redis client are owned by the caller.

    Without ``redis`` revocations are not published (other processes keep a cached key up to
    ``cache_ttl``); the cache itself is off until :meth:`up` (the revocation feed's call).
    ``cache_ttl=0`` turns it off for good.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        redis: Redis | None = None,
        namespace: str | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        touch_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_ttl < 0 or cache_size < 1:
            raise ValueError("cache_ttl must not be negative and cache_size must be positive")
        if redis is not None and namespace is None:
            raise ValueError("publishing revocations needs the namespace")
        self._pool = pool
        self._redis = redis
        self.namespace = namespace
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.touch_interval = touch_interval
        self._clock = clock
        self._caching = False
        self._cache: collections.OrderedDict[bytes, _Cached] = collections.OrderedDict()
        self._by_key: dict[str, bytes] = {}
        self._by_owner: dict[uuid.UUID, set[bytes]] = {}
        self._generation = 0
        """Bumped by every invalidation: a lookup that saw it change does not cache its answer."""

    @property
    def revocations_channel(self) -> str | None:
        return None if self.namespace is None else f"{self.namespace}:revocations"

    @property
    def caching(self) -> bool:
        """Whether verified keys are being remembered (the revocation feed is up)."""
        return self._caching

    # --- the revocation feed's listener ---------------------------------------------------

    def up(self) -> None:
        """The feed is subscribed: start caching, from empty."""
        self._forget_all()
        self._caching = self.cache_ttl > 0

    def down(self) -> None:
        """The feed is lost: revocations could go unheard, so forget and stop caching."""
        self._caching = False
        self._forget_all()

    def notice(self, notice: Notice | None) -> None:
        """A revocation was published (``None``: one that could not be read)."""
        if notice is None:
            self._forget_all()
            return
        self._generation += 1
        if notice.key_id is not None:
            self._drop(self._by_key.get(notice.key_id))
        if notice.user_id is not None:
            for digest in list(self._by_owner.get(notice.user_id, ())):
                self._drop(digest)

    def _forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._by_key.clear()
        self._by_owner.clear()

    def _drop(self, digest: bytes | None) -> None:
        if digest is None:
            return
        entry = self._cache.pop(digest, None)
        if entry is None:
            return
        key = entry.key
        if self._by_key.get(key.key_id) == digest:
            del self._by_key[key.key_id]
        owned = self._by_owner.get(key.owner_id)
        if owned is not None:
            owned.discard(digest)
            if not owned:
                del self._by_owner[key.owner_id]

    def _remember(self, digest: bytes, key: ApiKey, generation: int) -> None:
        if not self._caching or generation != self._generation:
            return
        self._drop(self._by_key.get(key.key_id))
        self._cache[digest] = _Cached(key, self._clock() + self.cache_ttl)
        self._by_key[key.key_id] = digest
        self._by_owner.setdefault(key.owner_id, set()).add(digest)
        while len(self._cache) > self.cache_size:
            self._drop(next(iter(self._cache)))

    # --- keys ---------------------------------------------------------------------------

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
        match = _PRESENTED.match(presented)
        if match is None:
            raise self._refused(InvalidApiKey("malformed"))
        key_id, secret = match.groups()
        digest = _digest(secret)
        if self._caching:
            entry = self._cache.get(digest)
            if entry is not None and entry.key.key_id == key_id:
                if self._clock() < entry.expires:
                    self._cache.move_to_end(digest)
                    _HIT.inc()
                    return entry.key
                self._drop(digest)
            _MISS.inc()
        generation = self._generation
        try:
            key = await self._lookup(key_id, digest)
        except InvalidApiKey as exc:
            raise self._refused(exc) from None
        self._remember(digest, key, generation)
        return key

    def _refused(self, exc: InvalidApiKey) -> InvalidApiKey:
        AUTH_FAILURES.labels("api_key", exc.reason).inc()
        log.info("auth.api_key_refused", reason=exc.reason)
        return exc

    async def _lookup(self, key_id: str, digest: bytes) -> ApiKey:
        """The key from PostgreSQL, checked (and its last use recorded now and then)."""
        row = await self._pool.fetchrow(
            "SELECT k.owner_id, k.name, k.scopes, k.secret_hash, k.revoked_at, k.last_used_at, "
            "a.state FROM ingest.api_keys k "
            "LEFT JOIN ingest.accounts a ON a.user_id = k.owner_id WHERE k.key_id = $1",
            key_id,
        )
        if row is None:
            raise InvalidApiKey("unknown")
        if not hmac.compare_digest(row["secret_hash"], digest):
            raise InvalidApiKey("mismatch")
        if row["revoked_at"] is not None:
            raise InvalidApiKey("revoked")
        if row["state"] != "active":
            raise InvalidApiKey("owner_inactive")
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
        revoked = [(row["key_id"], owner_id) for row in rows]
        await self._announce(revoked)
        return len(revoked)

    async def _revoke(self, key_id: str, owner_id: uuid.UUID | None) -> bool:
        row = await self._pool.fetchrow(
            "UPDATE ingest.api_keys SET revoked_at = $2 WHERE key_id = $1 "
            "AND ($3::uuid IS NULL OR owner_id = $3) AND revoked_at IS NULL RETURNING owner_id",
            key_id,
            datetime.fromtimestamp(self._clock(), UTC),
            owner_id,
        )
        if row is None:
            return False
        await self._announce([(key_id, row["owner_id"])])
        return True

    async def _announce(self, revoked: list[tuple[str, uuid.UUID]]) -> None:
        """Forget the keys here, then tell every other process (after the commit, on purpose).

        Published before the commit, a message could be acted on by a process whose next lookup
        still saw the key live and cached it again; after it, any lookup that starts once the
        message is heard sees the revocation, and one already under way is not cached.
        """
        for key_id, owner_id in revoked:
            self.notice(Notice(user_id=owner_id, key_id=key_id, reason=REVOCATION_REASON))
            log.info("auth.api_key_revoked", key_id=key_id, owner_id=str(owner_id))
        channel = self.revocations_channel
        if not revoked or self._redis is None or channel is None:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key_id, owner_id in revoked:
            pipe.publish(
                channel,
                encode_revocation(Revocation(NO_SESSION, owner_id, REVOCATION_REASON, key_id)),
            )
        try:
            await pipe.execute()
        except Exception:
            log.error(
                "auth.api_key_revocation_unpublished",
                key_ids=[key_id for key_id, _ in revoked],
                cache_ttl=self.cache_ttl,
                exc_info=True,
            )
