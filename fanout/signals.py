"""Ephemeral signals over Redis pub/sub: revocations in, typing and presence both ways.

Nothing here touches the log. Each node subscribes once (one connection) to three channels
of its namespace:

* ``<ns>:revocations`` (published by ingest's session store): close the session's sockets;
* ``<ns>:typing``: ``{"conversation_id", "user_id"}``, delivered to the conversation's
  local members other than the typist;
* ``<ns>:presence``: ``{"user_id", "status", "conversations"}``, delivered to the local
  members of those conversations.

Presence is a sorted set per user, ``<ns>:presence:<user>``, of the nodes holding one of
their sockets, scored by expiry: a node adds itself on the user's first local socket and
renews every third of the TTL; "online" is published when the set goes from empty to one
node, "offline" when the last node leaves. A crashed node's entries lapse with the TTL
(readers of the set see the user offline; no "offline" is published for them).

Outgoing signals go through one queue and one sender task: the socket code never awaits
Redis, and bursts are pipelined.

Revocations published while the subscription is down are never heard (pub/sub delivers at
most once), so the listener works like ingest's revocation feed (:mod:`ingest.auth.feed`):
it PINGs every ``ping_interval`` seconds and declares the subscription lost after three
silent intervals (a half-open connection otherwise looks idle for minutes); and every time Redis
confirms a (re)subscription, ``generation`` grows and ``on_subscribed`` runs, for the hub to
re-check the session of every open socket against the session store: whatever was revoked
during the gap is found there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis

from eventstore.epoch import epoch_channel
from eventstore.redisclient import close_pubsub

log = structlog.get_logger(__name__)

DEFAULT_PING_INTERVAL = 5.0
"""Seconds between PINGs on the subscription; three silent intervals mean it is lost."""
_RETRY_PAUSE = 1.0


class TypingSignal(msgspec.Struct, frozen=True):
    conversation_id: uuid.UUID
    user_id: uuid.UUID


class PresenceSignal(msgspec.Struct, frozen=True):
    user_id: uuid.UUID
    status: str
    conversations: list[uuid.UUID]


class RevocationSignal(msgspec.Struct, frozen=True):
    session_id: uuid.UUID
    user_id: uuid.UUID
    reason: str = ""


class EpochSignal(msgspec.Struct, frozen=True):
    """Published by ``backbone restore-log`` once the log was restored under a new epoch."""

    epoch: int


_encode = msgspec.json.Encoder().encode
_typing = msgspec.json.Decoder(TypingSignal).decode
_presence = msgspec.json.Decoder(PresenceSignal).decode
_revocation = msgspec.json.Decoder(RevocationSignal).decode
_epoch = msgspec.json.Decoder(EpochSignal).decode

Outgoing = tuple[str, Any]


class Signals:
    def __init__(
        self,
        redis: Redis,
        namespace: str,
        node_id: str,
        *,
        presence_ttl: float,
        on_typing: Callable[[TypingSignal], None],
        on_presence: Callable[[PresenceSignal], None],
        on_revocation: Callable[[RevocationSignal], None],
        on_epoch: Callable[[EpochSignal], None],
        on_subscribed: Callable[[], None] | None = None,
        ping_interval: float = DEFAULT_PING_INTERVAL,
    ) -> None:
        if ping_interval <= 0:
            raise ValueError("ping_interval must be positive")
        self._redis = redis
        self._ns = namespace
        self._node = node_id
        self._ttl = presence_ttl
        self._on = {
            f"{namespace}:typing": lambda raw: on_typing(_typing(raw)),
            f"{namespace}:presence": lambda raw: on_presence(_presence(raw)),
            f"{namespace}:revocations": lambda raw: on_revocation(_revocation(raw)),
            epoch_channel(namespace): lambda raw: on_epoch(_epoch(raw)),
        }
        self._on_subscribed = on_subscribed
        self.ping_interval = ping_interval
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.subscribed = asyncio.Event()
        """Set while the subscription is confirmed by Redis and believed alive."""
        self.generation = 0
        """How many times a subscription was confirmed: a socket authenticated under one
        generation and admitted under another may have missed a revocation in between."""

    def _presence_key(self, user_id: uuid.UUID) -> str:
        return f"{self._ns}:presence:{user_id}"

    # --- out ---------------------------------------------------------------------------

    def typing(self, conversation_id: uuid.UUID, user_id: uuid.UUID) -> None:
        self._outbox.put_nowait(("typing", TypingSignal(conversation_id, user_id)))

    def online(self, user_id: uuid.UUID, conversations: Iterable[uuid.UUID]) -> None:
        self._outbox.put_nowait(("online", PresenceSignal(user_id, "online", list(conversations))))

    def offline(self, user_id: uuid.UUID, conversations: Iterable[uuid.UUID]) -> None:
        self._outbox.put_nowait(
            ("offline", PresenceSignal(user_id, "offline", list(conversations)))
        )

    async def send(self) -> None:
        """The sender task: drain the outbox, a burst per pipeline."""
        while True:
            _raise_if_cancelled()
            items = [await self._outbox.get()]
            while not self._outbox.empty() and len(items) < 500:
                items.append(self._outbox.get_nowait())
            try:
                await self._send(items)
            except Exception:  # signals are best effort; the node carries on
                log.warning("fanout.signals_failed", exc_info=True, count=len(items))

    async def _send(self, items: list[Outgoing]) -> None:
        now = time.time()
        pipe = self._redis.pipeline(transaction=True)
        for kind, signal in items:
            if kind == "typing":
                pipe.publish(f"{self._ns}:typing", _encode(signal))
            else:
                key = self._presence_key(signal.user_id)
                pipe.zremrangebyscore(key, "-inf", now)
                if kind == "online":
                    pipe.zadd(key, {self._node: now + self._ttl})
                else:
                    pipe.zrem(key, self._node)
                pipe.zcard(key)
                pipe.expire(key, int(self._ttl * 2))
        results = await pipe.execute()
        cursor = 0
        announce = self._redis.pipeline(transaction=False)
        for kind, signal in items:
            if kind == "typing":
                cursor += 1
                continue
            count = results[cursor + 2]
            cursor += 4
            if (kind == "online" and count == 1) or (kind == "offline" and count == 0):
                announce.publish(f"{self._ns}:presence", _encode(signal))
        if len(announce):
            await announce.execute()

    async def heartbeat(self, users: Callable[[], Iterable[uuid.UUID]]) -> None:
        """Renew this node's presence entries every third of the TTL."""
        while True:
            _raise_if_cancelled()
            await asyncio.sleep(self._ttl / 3)
            expiry = time.time() + self._ttl
            pipe = self._redis.pipeline(transaction=False)
            for user_id in list(users()):
                key = self._presence_key(user_id)
                pipe.zadd(key, {self._node: expiry})
                pipe.expire(key, int(self._ttl * 2))
            try:
                await pipe.execute()
            except Exception:  # the next beat tries again
                log.warning("fanout.heartbeat_failed", exc_info=True)

    # --- in ----------------------------------------------------------------------------

    async def listen(self) -> None:
        """Receive the channels until cancelled; resubscribe after Redis errors or silence."""
        loop = asyncio.get_running_loop()
        while True:
            _raise_if_cancelled()
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(*self._on)
                confirmed = 0
                heard = pinged = loop.time()
                while True:
                    _raise_if_cancelled()
                    message = await pubsub.get_message(timeout=min(1.0, self.ping_interval))
                    now = loop.time()
                    if message is not None:
                        heard = now
                        kind = message["type"]
                        if kind == "message":
                            self._dispatch(message["channel"], message["data"])
                        elif kind == "subscribe":
                            confirmed += 1
                            if confirmed == len(self._on):
                                self._up()
                    if now - pinged >= self.ping_interval:
                        await pubsub.ping()
                        pinged = now
                    if now - heard > 3 * self.ping_interval:
                        raise ConnectionError("the signal subscription went silent")
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis went away: resubscribe after a pause
                self.subscribed.clear()
                log.warning("fanout.pubsub_lost", exc_info=True)
                await asyncio.sleep(_RETRY_PAUSE)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await close_pubsub(pubsub)

    def _up(self) -> None:
        """Every channel is confirmed: from here on nothing published is missed."""
        self.generation += 1
        self.subscribed.set()
        log.info("fanout.pubsub_up", generation=self.generation)
        if self._on_subscribed is not None:
            self._on_subscribed()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        handler = self._on.get(channel.decode() if isinstance(channel, bytes) else channel)
        if handler is None:
            return
        try:
            handler(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("fanout.bad_signal", channel=str(channel))


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that a client library swallowed (redis-py can, mid-command).

    Without this a loop whose cancellation was eaten waits on its next ``await`` forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
