"""Personal-data encryption: per-subject data keys, wrapped by a master key, and crypto-shredding.

Every person (subject) has a random 256-bit data key. Personal fields of their events are
sealed with AES-GCM under that key before the event enters the log; the key itself is stored in
PostgreSQL wrapped (AES-GCM) by a master key from configuration. Erasing a subject deletes the
wrapped key: every copy of their events, in Kafka, in the S3 archive and in backups of the
log, becomes unreadable at that moment, and decoders yield :data:`schemas.ERASED` instead.

A sealed value is the string ``pd1:`` + base64(subject uuid || 96-bit nonce || ciphertext+tag).
It names its own subject, so tools can tell whose key a value needs without the schema. The
event id is the AES-GCM associated data: a sealed value cannot be replayed into another event.

Keys are cached per process. An erasure is announced with ``NOTIFY`` so every process drops
its cached copy at once. A process caches keys only while it listens: one that loses its
listening connection drops its whole cache, caches nothing until it has subscribed again (with
backoff), and clears the cache once more then (notices sent in between were missed). A key read
while a notice arrived is not cached, as that notice found nothing to forget.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import os
import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import asyncpg
import pybase64
import structlog
from asyncpg.pool import PoolConnectionProxy
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore.errors import DecodeError, KeyStoreUnavailable, SubjectErased
from eventstore.pg import Pool
from eventstore.settings import MasterKey
from schemas.personal import ERASED, Erased

SEAL_PREFIX: Final = "pd1:"
_NONCE = 12
_UUID = 16
SUBJECT_BYTES: Final = _UUID
"""The sealed value's bytes begin with its subject's."""
ERASURE_CHANNEL: Final = "backbone_data_key_erased"

log = structlog.get_logger(__name__)

KeyLookup = Mapping[uuid.UUID, AESGCM | None]
"""Subject -> its data key, or ``None`` once erased. A subject never keyed is absent."""
_NEVER_KEYED: Final = object()


class _Nonces:
    """Random 96-bit AES-GCM nonces from the operating system's CSPRNG, drawn a few kilobytes
    at a time: a ``getrandom`` call per value cost as much as sealing a short message.

    Every nonce is handed out once: the buffer is cut by a C iterator, whose every step is
    atomic under the GIL whatever the thread, and a forked child starts with an empty one, so
    no two seals anywhere share a nonce by way of this buffer.
    """

    _DRAW: Final = _NONCE * 512

    def __init__(self) -> None:
        self._cuts: Iterator[tuple[bytes]] = iter(())
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._cuts = iter(())

    def next(self) -> bytes:
        try:
            return next(self._cuts)[0]
        except StopIteration:
            self._cuts = struct.iter_unpack(f"{_NONCE}s", os.urandom(self._DRAW))
            return next(self._cuts)[0]


_nonces = _Nonces()


def seal(key: AESGCM, subject: uuid.UUID, event_id: uuid.UUID, plaintext: str) -> str:
    """Encrypt one personal value of ``subject`` for the event ``event_id``."""
    nonce = _nonces.next()
    ciphertext = key.encrypt(nonce, plaintext.encode("utf-8"), event_id.bytes)
    return SEAL_PREFIX + pybase64.b64encode_as_string(subject.bytes + nonce + ciphertext)


def sealed_subject(sealed: str) -> uuid.UUID:
    """The subject a sealed value belongs to (no key needed)."""
    return subject_of(sealed_bytes(sealed))


def unseal(keys: KeyLookup, event_id: uuid.UUID, sealed: str) -> str | Erased:
    """Decrypt a sealed value; :data:`ERASED` when its subject's key is gone."""
    return unseal_bytes(keys_by_head(keys), event_id, sealed_bytes(sealed))


HeadKeys = Mapping[bytes, AESGCM | None]
"""A :data:`KeyLookup` keyed by each subject's 16 bytes, as they head its sealed values: a
reader looks the key up by the head it holds, in C (a ``bytes`` hashes in C; a
:class:`uuid.UUID` hashes, and compares, in Python), building no :class:`uuid.UUID` per
value."""


def keys_by_head(keys: KeyLookup) -> dict[bytes, AESGCM | None]:
    """``keys`` as :data:`HeadKeys`."""
    return {subject.bytes: key for subject, key in keys.items()}


def unseal_bytes(keys: HeadKeys, event_id: uuid.UUID, raw: bytes) -> str | Erased:
    """:func:`unseal` of a value already read by :func:`sealed_bytes` (readers that needed its
    subject first decode the base64 once, not twice)."""
    key = keys.get(raw[:_UUID], _NEVER_KEYED)
    if key is None:
        return ERASED
    if not isinstance(key, AESGCM):  # _NEVER_KEYED
        # Nothing can have been sealed for a subject that never had a key: this value is
        # corrupt, or the key store is not the one this log was written with.
        raise DecodeError(f"no data key was ever made for subject {subject_of(raw)}")
    try:
        # The id's bytes from its int: ``UUID.bytes`` does the same in a Python frame.
        aad = event_id.int.to_bytes(16)
        return key.decrypt(raw[_UUID : _UUID + _NONCE], raw[_UUID + _NONCE :], aad).decode("utf-8")
    except InvalidTag:
        raise DecodeError(
            f"sealed value of subject {subject_of(raw)} does not authenticate for event {event_id}"
        ) from None


def subject_of(raw: bytes) -> uuid.UUID:
    """The subject of a value read by :func:`sealed_bytes`."""
    return subject_of_head(raw[:SUBJECT_BYTES])


@functools.lru_cache(maxsize=65536)
def subject_of_head(head: bytes) -> uuid.UUID:
    """The subject whose 16 bytes ``head`` is (the first :data:`SUBJECT_BYTES` of a sealed
    value): built once per subject, as a subject's values recur and :class:`uuid.UUID` is
    slow to build."""
    return uuid.UUID(bytes=head)


def sealed_bytes(sealed: str) -> bytes:
    """The bytes of a sealed value (subject, nonce, ciphertext); :class:`DecodeError` if it is
    not one."""
    if not sealed.startswith(SEAL_PREFIX):
        raise DecodeError("personal field is not sealed")
    try:
        # pybase64 (SIMD) decodes a kilobyte in a fifth of binascii's time; ``validate``
        # rejects anything but the canonical alphabet and padding.
        raw = pybase64.b64decode(sealed[len(SEAL_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("sealed value is not valid base64") from None
    if len(raw) < _UUID + _NONCE + 16:
        raise DecodeError("sealed value is truncated")
    return raw


def _wrap(master: MasterKey, subject: uuid.UUID, data_key: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(master.key).encrypt(nonce, data_key, subject.bytes)


def _unwrap(master: MasterKey, subject: uuid.UUID, wrapped: bytes) -> bytes:
    try:
        return AESGCM(master.key).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], subject.bytes)
    except InvalidTag:
        raise KeyStoreUnavailable(
            f"data key of {subject} does not unwrap with master key {master.key_id!r}: "
            "wrong BACKBONE_MASTER_KEY?"
        ) from None


_BACKOFF_MIN: Final = 0.1
_BACKOFF_MAX: Final = 5.0
_SUBSCRIBE_TIMEOUT: Final = 10.0
_PING_TIMEOUT: Final = 10.0


async def _give_back(pool: Pool, conn: PoolConnectionProxy[Any]) -> None:
    """Release ``conn`` to ``pool`` whatever its state (a dead one is replaced by the pool)."""
    try:
        async with asyncio.timeout(_PING_TIMEOUT):
            await pool.release(conn)
    except Exception as exc:  # noqa: BLE001 - a connection that cannot be released is dropped
        log.warning("keyring.release_failed", error=str(exc) or type(exc).__name__)
        with contextlib.suppress(Exception):  # already detached from its connection
            conn.terminate()


class KeyRing:
    """Data keys of subjects: created on first write, cached, destroyed on erasure.

    The pool is owned by the caller. :meth:`start` takes one connection from it to listen for
    erasures made by other processes (replaced when lost; pinged every ``ping_interval``
    seconds, as a dropped network closes nothing); :meth:`close` gives it back. A ring that
    does not listen caches nothing.
    """

    def __init__(
        self,
        pool: Pool,
        master_keys: Sequence[MasterKey],
        *,
        cache_size: int = 100_000,
        ping_interval: float = 30.0,
    ) -> None:
        if not master_keys:
            raise ValueError("at least one master key is needed")
        self._pool = pool
        self._masters = {m.key_id: m for m in master_keys}
        self._current = master_keys[0]
        # Holds entries only while the listener is subscribed (see ``_remember``): a key is
        # trusted only while this process would hear of its erasure.
        self._cache: OrderedDict[uuid.UUID, AESGCM | None] = OrderedDict()
        self._cache_size = cache_size
        self._ping_interval = ping_interval
        self._listener: PoolConnectionProxy[Any] | None = None
        self._listening = False
        # Bumped by every erasure notice, every loss and every (re)subscription: a key read
        # from the database is cached only if nothing was bumped since the read began.
        self._epoch = 0
        self._subscriptions = 0
        self._notices = 0
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._lost_callback: Callable[[object], None] = lambda _: None

    async def start(self) -> None:
        """Listen for erasures announced by other processes, and keep listening: a lost
        connection is replaced (with backoff) and the cache is unused until it is."""
        if self._keeper is not None:
            return
        conn = await self._subscribe()
        self._keeper = asyncio.create_task(self._keep_listening(conn), name="keyring-listener")

    async def close(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def __aenter__(self) -> KeyRing:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def listening(self) -> bool:
        """Whether erasures by other processes are heard now (the cache is used only then)."""
        return self._listening

    @property
    def listener_pid(self) -> int | None:
        """The PostgreSQL backend pid of the listening connection, while there is one."""
        conn = self._listener
        return None if conn is None or conn.is_closed() else conn.get_server_pid()

    @property
    def subscriptions(self) -> int:
        """How many times the listener has subscribed (1 after :meth:`start`)."""
        return self._subscriptions

    @property
    def notices(self) -> int:
        """How many erasure notices were heard."""
        return self._notices

    async def wait_subscribed(self, count: int) -> None:
        """Wait until the listener has subscribed ``count`` times in all, and listens."""
        await self._wait(lambda: self._subscriptions >= count and self._listening)

    async def wait_notices(self, count: int) -> None:
        """Wait until ``count`` erasure notices in all were heard."""
        await self._wait(lambda: self._notices >= count)

    async def _wait(self, done: Callable[[], bool]) -> None:
        while True:
            changed = self._changed
            if done():
                return
            await changed.wait()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _subscribe(self) -> PoolConnectionProxy[Any]:
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(ERASURE_CHANNEL, self._on_erasure_notice)
            if conn.is_closed():
                raise asyncpg.InterfaceError("the listening connection closed")
        except BaseException:
            await _give_back(self._pool, conn)
            raise

        def lost(_: object) -> None:
            if self._listener is conn:  # not a late word about an older connection
                self._on_listener_lost()

        conn.add_termination_listener(lost)
        self._lost_callback = lost
        # Notices sent while no connection listened were missed: nothing cached before this
        # point is trusted (the cache is empty then anyway, see ``_remember``).
        self._cache.clear()
        self._epoch += 1
        self._listener = conn
        self._listening = True
        self._lost.clear()
        self._subscriptions += 1
        self._signal()
        return conn

    async def _keep_listening(self, conn: PoolConnectionProxy[Any] | None) -> None:
        """Owns the listening connection: replaces it when lost, gives it back when cancelled."""
        backoff = _BACKOFF_MIN
        try:
            while True:
                if conn is not None:
                    await self._watch(conn)
                    # Lost: stop trusting the cache now, then give the dead connection back.
                    self._on_listener_lost()
                    self._listener = None
                    await _give_back(self._pool, conn)
                    conn = None
                try:
                    async with asyncio.timeout(_SUBSCRIBE_TIMEOUT):
                        conn = await self._subscribe()
                    log.info("keyring.listener_resubscribed", action="cache cleared")
                    backoff = _BACKOFF_MIN
                except Exception as exc:  # noqa: BLE001 - any failure: retry after a pause
                    log.warning("keyring.resubscribe_failed", error=str(exc), retry_in=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            self._drop_trust()
            self._listener = None
            if conn is not None:
                if not conn.is_closed():
                    conn.remove_termination_listener(self._lost_callback)
                    try:
                        async with asyncio.timeout(_PING_TIMEOUT):
                            await conn.remove_listener(ERASURE_CHANNEL, self._on_erasure_notice)
                    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        conn.terminate()
                await _give_back(self._pool, conn)

    async def _watch(self, conn: PoolConnectionProxy[Any]) -> None:
        """Return once ``conn`` is lost: closed, or silent to a ping (a dropped network sends
        no FIN, so a closed socket alone would not tell)."""
        while not self._lost.is_set() and not conn.is_closed():
            try:
                async with asyncio.timeout(self._ping_interval):
                    await self._lost.wait()
                return
            except TimeoutError:
                pass
            try:
                async with asyncio.timeout(_PING_TIMEOUT):
                    await conn.execute("SELECT 1")
            except Exception as exc:  # noqa: BLE001 - whatever the failure, it is lost
                log.warning("keyring.listener_silent", error=str(exc) or type(exc).__name__)
                conn.terminate()
                return

    def _on_erasure_notice(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._epoch += 1
        self._notices += 1
        try:
            self.forget(uuid.UUID(str(payload)))
        except ValueError:
            self._cache.clear()
        self._signal()

    def _on_listener_lost(self) -> None:
        # Notices may be missed while no connection listens: trust nothing cached, and cache
        # nothing, until the listener has subscribed again.
        if self._listening:
            log.warning("keyring.listener_lost", action="cache cleared until resubscribed")
        self._drop_trust()
        self._lost.set()

    def _drop_trust(self) -> None:
        self._listening = False
        self._epoch += 1
        self._cache.clear()
        self._signal()

    def forget(self, subject: uuid.UUID) -> None:
        """Drop a subject's cached key (after an erasure seen elsewhere)."""
        self._cache.pop(subject, None)

    def _remember(self, subject: uuid.UUID, key: AESGCM | None, read_at: int | None) -> None:
        """Cache ``key``, read from the database when the epoch was ``read_at``: only if the
        listener is subscribed and no notice (nor loss) came since (a notice that arrived
        while the read was under way found nothing to forget). An erased subject (``None``,
        ``read_at`` ``None``) stays erased, so it is cached whenever the listener is."""
        if not self._listening or (read_at is not None and read_at != self._epoch):
            return
        self._cache[subject] = key
        self._cache.move_to_end(subject)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _open(self, subject: uuid.UUID, master_key_id: str, wrapped: bytes) -> AESGCM:
        master = self._masters.get(master_key_id)
        if master is None:
            raise KeyStoreUnavailable(
                f"data key of {subject} is wrapped by master key {master_key_id!r}, "
                "which BACKBONE_MASTER_KEY does not list"
            )
        return AESGCM(_unwrap(master, subject, wrapped))

    def cached_write_key(self, subject: uuid.UUID) -> AESGCM | None:
        """The subject's cached key, or ``None`` when :meth:`keys_for_write` must be asked
        (not cached, or erased: that path raises)."""
        return self._cache.get(subject)

    async def keys_for_write(self, subjects: Iterable[uuid.UUID]) -> dict[uuid.UUID, AESGCM]:
        """Keys to seal new personal data with, created where missing.

        Raises :class:`SubjectErased` when any subject is erased: nothing personal of an
        erased person may enter the log again.
        """
        wanted = set(subjects)
        found: dict[uuid.UUID, AESGCM] = {}
        missing: list[uuid.UUID] = []
        for subject in wanted:
            if subject in self._cache:
                key = self._cache[subject]
                if key is None:
                    raise SubjectErased(f"subject {subject} is erased")
                found[subject] = key
            else:
                missing.append(subject)
        if missing:
            read_at = self._epoch
            rows = [
                (s, self._current.key_id, _wrap(self._current, s, AESGCM.generate_key(256)))
                for s in missing
            ]
            try:
                async with self._pool.acquire() as conn:
                    # Insert-if-absent then read back: concurrent writers converge on one key.
                    await conn.executemany(
                        "INSERT INTO data_keys (subject, master_key_id, wrapped) "
                        "VALUES ($1, $2, $3) ON CONFLICT (subject) DO NOTHING",
                        rows,
                    )
                    stored = await conn.fetch(
                        "SELECT subject, master_key_id, wrapped FROM data_keys "
                        "WHERE subject = ANY($1::uuid[])",
                        missing,
                    )
            except (OSError, asyncpg.PostgresError) as exc:
                raise KeyStoreUnavailable(f"key store unreachable: {exc}") from exc
            for row in stored:
                subject = row["subject"]
                if row["wrapped"] is None:
                    self._remember(subject, None, None)
                    raise SubjectErased(f"subject {subject} is erased")
                key = self._open(subject, row["master_key_id"], row["wrapped"])
                self._remember(subject, key, read_at)
                found[subject] = key
        return found

    async def keys_for_read(self, subjects: Iterable[uuid.UUID]) -> dict[uuid.UUID, AESGCM | None]:
        """Keys to open sealed values: ``None`` for erased subjects; never-keyed ones absent."""
        result: dict[uuid.UUID, AESGCM | None] = {}
        missing: list[uuid.UUID] = []
        for subject in set(subjects):
            if subject in self._cache:
                result[subject] = self._cache[subject]
            else:
                missing.append(subject)
        if missing:
            read_at = self._epoch
            try:
                async with self._pool.acquire() as conn:
                    stored = await conn.fetch(
                        "SELECT subject, master_key_id, wrapped FROM data_keys "
                        "WHERE subject = ANY($1::uuid[])",
                        missing,
                    )
            except (OSError, asyncpg.PostgresError) as exc:
                raise KeyStoreUnavailable(f"key store unreachable: {exc}") from exc
            by_subject = {row["subject"]: row for row in stored}
            for subject in missing:
                row = by_subject.get(subject)
                if row is None:
                    continue  # never keyed; not cached, since a key may be made later
                key = (
                    None
                    if row["wrapped"] is None
                    else self._open(subject, row["master_key_id"], row["wrapped"])
                )
                self._remember(subject, key, None if key is None else read_at)
                result[subject] = key
        return result

    async def erase(self, subject: uuid.UUID) -> bool:
        """Destroy a subject's data key for good; return whether a key was destroyed.

        Erasing twice, or erasing a subject that never had a key, is allowed: the subject is
        marked erased either way so that no key can be created for it afterwards.
        """
        try:
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    had_key = await conn.fetchval(
                        "SELECT wrapped IS NOT NULL FROM data_keys WHERE subject = $1 FOR UPDATE",
                        subject,
                    )
                    await conn.execute(
                        "INSERT INTO data_keys (subject, master_key_id, wrapped, erased_at) "
                        "VALUES ($1, NULL, NULL, now()) ON CONFLICT (subject) DO UPDATE SET "
                        "wrapped = NULL, master_key_id = NULL, "
                        "erased_at = coalesce(data_keys.erased_at, now())",
                        subject,
                    )
                    await conn.execute("SELECT pg_notify($1, $2)", ERASURE_CHANNEL, str(subject))
                # The old row version still holds the wrapped key until vacuumed; reclaim it
                # now so the key does not linger in the heap.
                await conn.execute("VACUUM data_keys")
        except (OSError, asyncpg.PostgresError) as exc:
            raise KeyStoreUnavailable(f"key store unreachable: {exc}") from exc
        self._remember(subject, None, None)
        return bool(had_key)

    async def is_erased(self, subject: uuid.UUID) -> bool:
        """Whether the subject has been erased."""
        keys = await self.keys_for_read([subject])
        if keys.get(subject) is not None:
            return False
        async with self._pool.acquire() as conn:
            erased = await conn.fetchval(
                "SELECT erased_at IS NOT NULL FROM data_keys WHERE subject = $1", subject
            )
        return bool(erased)
