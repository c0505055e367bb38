"""The revocation feed, heard by ingest: what lets a process cache credentials safely.

Every revocation is PUBLISHed on ``<namespace>:revocations`` (see
:class:`ingest.auth.sessions.Revocation`): sessions by :class:`~ingest.auth.sessions.SessionStore`,
API keys by :class:`~ingest.auth.apikeys.ApiKeys`. :class:`RevocationFeed` keeps one subscription
per process and tells its listener three things:

- ``up()``: the subscription is confirmed by Redis. Every revocation published from now on
  will be heard, so caching may start (from empty: what was cached before may have missed one).
- ``notice(n)``: a revocation; ``None`` when a message on the channel could not be read, which
  must be taken as "anything may have been revoked".
- ``down()``: the subscription is lost (a Redis error, or silence past the heartbeat bound) or
  the feed stops. Nothing published now would be heard: stop caching and forget everything.

Pub/sub delivers at most once and a broken TCP connection can look idle for minutes, so the feed
PINGs every ``heartbeat`` seconds and declares the subscription lost when it has heard nothing
(not even the PONG) for three heartbeats. It then resubscribes after a pause, like fanout's
signal listener; losing Redis costs a cache, never a revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Final, Protocol

import msgspec
import structlog
from redis.asyncio import Redis

from eventstore.redisclient import close_pubsub

DEFAULT_HEARTBEAT: Final = 5.0
"""Seconds between PINGs on the subscription; three silent heartbeats mean it is lost."""
_RETRY_PAUSE: Final = 1.0

log = structlog.get_logger(__name__)


class Notice(msgspec.Struct, frozen=True):
    """One message of the feed, read leniently (every field is optional to a listener).

    Session revocations carry ``session_id``, ``user_id`` and ``reason``; API-key revocations
    also carry ``key_id`` (and the nil UUID as ``session_id``, for readers that require one).
    """

    user_id: uuid.UUID | None = None
    session_id: uuid.UUID | None = None
    reason: str = ""
    key_id: str | None = None


_decode_notice = msgspec.json.Decoder(Notice).decode


class FeedListener(Protocol):
    def up(self) -> None: ...

    def down(self) -> None: ...

    def notice(self, notice: Notice | None) -> None: ...


class RevocationFeed:
    """One subscription to ``channel``, run by :meth:`start` until :meth:`stop`."""

    def __init__(
        self,
        redis: Redis,
        channel: str,
        listener: FeedListener,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        if heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        self._redis = redis
        self.channel = channel
        self._listener = listener
        self.heartbeat = heartbeat
        self.live = asyncio.Event()
        """Set while the subscription is confirmed and believed alive."""
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait: float = 5.0) -> None:
        """Run the feed in a task; wait up to ``wait`` seconds for the first subscription.

        A feed that is not up yet is not an error: the listener simply does not cache until it
        is.
        """
        if self._task is not None:
            return
        self._task = asyncio.create_task(self.run(), name="auth.revocation_feed")
        try:
            async with asyncio.timeout(wait):
                await self.live.wait()
        except TimeoutError:
            log.warning("auth.revocation_feed_not_up", channel=self.channel, waited=wait)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """Subscribe, listen, resubscribe after losses; until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            _raise_if_cancelled()
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                heard = pinged = loop.time()
                while True:
                    _raise_if_cancelled()
                    message = await pubsub.get_message(timeout=min(1.0, self.heartbeat))
                    now = loop.time()
                    if message is not None:
                        heard = now
                        kind = message["type"]
                        if kind == "message":
                            self._deliver(message["data"])
                        elif kind == "subscribe" and not self.live.is_set():
                            # Confirmed by the server: from here on nothing published is missed.
                            self.live.set()
                            self._listener.up()
                            log.info("auth.revocation_feed_up", channel=self.channel)
                    if now - pinged >= self.heartbeat:
                        await pubsub.ping()
                        pinged = now
                    if now - heard > 3 * self.heartbeat:
                        raise ConnectionError("the revocation feed went silent")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("auth.revocation_feed_lost", channel=self.channel, exc_info=True)
                self._lost()
                await asyncio.sleep(_RETRY_PAUSE)
            finally:
                self._lost()
                with contextlib.suppress(Exception):
                    await close_pubsub(pubsub)

    def _lost(self) -> None:
        if self.live.is_set():
            self.live.clear()
        # Called even if never up: a listener's down() is idempotent and cheap.
        self._listener.down()

    def _deliver(self, data: bytes | str) -> None:
        try:
            notice = _decode_notice(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("auth.revocation_unreadable", channel=self.channel)
            self._listener.notice(None)
            return
        self._listener.notice(notice)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that redis-py swallowed mid-command (as fanout's listener does)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
