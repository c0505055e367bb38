"""The node's state and rules: who is connected, who hears what, resumes, closes.

Everything here runs on the event loop without locks. What must be atomic with respect to
delivery (registering a socket, starting a resume, finishing one) happens in synchronous
code between two batches of the tail, which is what makes resumes gap- and duplicate-free:

* registering: a socket's audience is computed from a snapshot of the read model brought up
  to the tail's position (:mod:`fanout.membership`), and ``since`` records that position:
  everything at or after it reaches the socket live;
* resuming a conversation (cursor ``k``): live frames of that conversation are held back
  from then on; the events in ``(k, since)`` are fetched (:mod:`fanout.history`); then, in
  one synchronous step, the replay, the held-back frames (offsets above the last replayed)
  and ``resynced`` are written. A cursor in the ``auth`` frame starts the resume at the very
  moment the socket subscribes, so the client gets strictly ordered events; a later
  ``resume`` still loses and repeats nothing, but live frames it already got may precede
  older replayed ones (positions order them).

A resume is bounded like any other output: held-back frames count against the socket's
``queue_limit`` (past it, 4008); the replay is written in steps of a fraction of the limit,
each once the socket has drained the previous ones (a socket that leaves its replay unread for
``replay_stall`` seconds is closed with 4008), and only the final step (the last replayed
frames, the held-back ones and ``resynced``) is synchronous. A socket that goes has its
replays cancelled.

Authorization changes follow log order: a ``MemberLeft`` is delivered to the leaver and the
leaver's sockets leave the room in the same step (a socket resuming that conversation gets
the replay, the held-back frames up to its removal and ``resynced``, then nothing more);
sessions revoked (Redis feed or log) and erased users have their sockets closed with 4001.
Revocations published only on the feed (refresh-token reuse, a password change) are lost while
it is down, so each time it is (re)subscribed every open socket's session is checked against
the session store (:meth:`Hub.on_subscribed`), and a socket authenticated while the feed was
down, or before it came back, is checked once it is open.

Credentials run out too: a socket is closed with ``token_expired`` and 4001 once its access
token's ``exp`` (plus the verification leeway) has passed, unless the client sent a later
``auth`` frame with a fresh token of the same user and a live session, which moves the
deadline. The first and later ``auth`` frames are verified by the same code as ingest's
requests (:meth:`SessionStore.authenticate`); deadlines are kept in one timing wheel
(:mod:`fanout.expiry`) that the node's sweep drains, not in a timer per socket.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final

import structlog

from eventstore import Batch, EventStore, InvalidPosition, Position, RecordedEvent
from eventstore.cloudevents import frame
from eventstore.codec import stream_placement
from fanout import frames
from fanout.audiences import Audiences
from fanout.config import FanoutConfig
from fanout.connection import ADMITTING, AUTH, CLOSED, HEAD, OPEN, Connection
from fanout.expiry import Expiries
from fanout.handshake import HttpRefusal, RequestHead
from fanout.history import History, ResumeFailed
from fanout.membership import Change, MembershipWindow, Snapshots
from fanout.metrics import (
    CLOSES,
    DELIVERIES,
    DELIVERY_LATENCY,
    EVENTS,
    REAUTHS,
    RESUMES,
    SLOW_DISCONNECTS,
    TOKEN_EXPIRIES,
)
from fanout.signals import EpochSignal, PresenceSignal, RevocationSignal, Signals, TypingSignal
from fanout.tail import Tail
from fanout.wire import (
    CLOSE_EPOCH_CHANGED,
    CLOSE_INTERNAL,
    CLOSE_TOO_SLOW,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    text_frame,
)
from ingest.auth import AccessClaims, AccessTokens, InvalidToken, SessionStore
from projectors.read import ReadSide
from schemas.events import (
    ConversationCreated,
    ConversationEvent,
    DirectConversationOpened,
    MemberJoined,
    MemberLeft,
    SessionRevoked,
    UserErased,
)

log = structlog.get_logger(__name__)

_REVOKED_MEMORY: Final = 300.0
"""Seconds a revoked session id is remembered, against a socket admitted during the revocation."""
_CLOSE_GRACE: Final = 5.0
"""Seconds a closed socket gets to drain its close frame before it is aborted."""
_BOOTSTRAP_WAIT: Final = 5.0
_RECHECK_PARALLEL: Final = 32
"""Session checks in flight at once when open sockets are re-checked after a feed gap."""
_RECHECK_RETRY: Final = 1.0
_LOCAL = EVENTS.labels("local")
_NOBODY = EVENTS.labels("none")

Route = Callable[[Connection], Coroutine[Any, Any, None]]


class Unavailable(Exception):
    """The read model is too far behind to admit a socket now (the client retries: 1013)."""


class ResumePlan:
    __slots__ = ("after", "conversation_id", "partition", "upto")

    def __init__(self, conversation_id: uuid.UUID, partition: int, after: int, upto: int):
        self.conversation_id = conversation_id
        self.partition = partition
        self.after = after
        self.upto = upto


class Hub:
    def __init__(
        self,
        config: FanoutConfig,
        store: EventStore,
        tail: Tail,
        *,
        tokens: AccessTokens,
        sessions: SessionStore,
        read_side: ReadSide,
        history: History,
        snapshots: Snapshots,
    ) -> None:
        self.config = config
        self.epoch = store.epoch
        self.epoch_changed = asyncio.Event()
        self._partitions = store.layout.partitions("conversation")
        self._topic = store.layout.topic("conversation")
        self.tail = tail
        self._tokens = tokens
        self._sessions = sessions
        self._read_side = read_side
        self._history = history
        self._snapshots = snapshots
        self.audiences: Audiences[Connection] = Audiences()
        self.window = MembershipWindow(config.membership_window, tail.start_offsets)
        self.connections: set[Connection] = set()
        self._by_session: dict[uuid.UUID, set[Connection]] = {}
        self.expiries: Expiries[Connection] = Expiries()
        self._revoked: dict[uuid.UUID, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._replays: dict[Connection, set[asyncio.Task[None]]] = {}
        self.signals: Signals | None = None
        self.http_routes: dict[str, Route] = {}
        self.draining = False
        self.emptied = asyncio.Event()

    # --- sockets -----------------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)

    def lost(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.expiries.discard(conn)
        for task in self._replays.pop(conn, ()):
            task.cancel()
        if self.draining and not self.connections:
            self.emptied.set()
        user_id = conn.user_id
        if user_id is None:
            return
        self._unbind_session(conn)
        conversations = list(self.audiences.conversations(user_id))
        if self.audiences.remove(conn, user_id) and self.signals is not None:
            self.signals.offline(user_id, conversations)

    def closing(self, conn: Connection) -> None:
        asyncio.get_running_loop().call_later(_CLOSE_GRACE, _abort, conn)

    def too_slow(self, conn: Connection) -> None:
        SLOW_DISCONNECTS.inc()
        self.close(conn, CLOSE_TOO_SLOW, "too slow; resume with your cursors")

    def close(self, conn: Connection, code: int, reason: str) -> None:
        if conn.state != CLOSED:
            CLOSES.labels(str(code)).inc()
            conn.close(code, reason)

    def http(self, conn: Connection, head: RequestHead) -> None:
        """Plain HTTP routes on the fanout port (set by the node: health, readiness, metrics)."""
        route = self.http_routes.get(head.path)
        if route is None or head.method != "GET":
            conn.refuse(HttpRefusal(404, "not found"))
            return
        self._spawn(route(conn))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- client frames -----------------------------------------------------------------

    def on_frame(self, conn: Connection, message: frames.ClientFrame) -> None:
        if conn.state == AUTH:
            if not isinstance(message, frames.Auth):
                self.close(conn, CLOSE_UNAUTHORIZED, "authenticate first")
                return
            conn.state = ADMITTING
            self._spawn(self._admit(conn, message))
        elif conn.state == ADMITTING:
            conn.violation("not_ready", "wait for the ready frame")
        elif isinstance(message, frames.Ping):
            conn.write_raw(frames.PONG)
        elif isinstance(message, frames.Resume):
            self.resume(conn, message.cursors)
        elif isinstance(message, frames.Typing):
            self.typing(conn, message.conversation_id)
        else:  # a later auth frame: a fresh token for this socket
            self._spawn(self._reauth(conn, message))

    async def _authenticate(self, token: str) -> AccessClaims:
        """Verify ``token`` and check its session is live, exactly as ingest does.

        :class:`InvalidToken` when refused (``reason`` names why, ``revoked`` included);
        anything else means Redis or PostgreSQL could not answer.
        """
        return await self._sessions.authenticate(token)

    def _deadline(self, claims: AccessClaims) -> int:
        """When a socket authenticated by ``claims`` must be closed (what ``verify`` allows)."""
        return claims.expires_at + self._tokens.leeway

    async def _admit(self, conn: Connection, auth: frames.Auth) -> None:
        feed = self._feed()
        try:
            claims = await self._authenticate(auth.token)
        except InvalidToken:
            self.close(conn, CLOSE_UNAUTHORIZED, "unauthorized")
            return
        except Exception:  # Redis/PostgreSQL down: the client tries again
            log.warning("fanout.auth_unavailable", exc_info=True)
            self.close(conn, CLOSE_TRY_AGAIN, "try again")
            return
        user_id, session_id = claims.user_id, claims.session_id
        try:
            conversations = await self._membership(user_id)
        except (Unavailable, TimeoutError):
            self.close(conn, CLOSE_TRY_AGAIN, "try again")
            return
        except Exception:  # the read model is unreachable: the client retries
            log.warning("fanout.bootstrap_failed", exc_info=True)
            self.close(conn, CLOSE_TRY_AGAIN, "try again")
            return
        # From here to the end: no await, so nothing is delivered in between.
        if conn.state != ADMITTING:
            return
        if session_id in self._revoked:
            self.close(conn, CLOSE_UNAUTHORIZED, "session revoked")
            return
        first = self.audiences.add(conn, user_id, conversations or ())
        conn.user_id, conn.session_id = user_id, session_id
        conn.since = self.tail.offsets
        conn.state = OPEN
        self._by_session.setdefault(session_id, set()).add(conn)
        self.expiries.set(conn, self._deadline(claims))
        conn.write_raw(frames.ready(self.epoch, user_id))
        if first and self.signals is not None:
            self.signals.online(user_id, self.audiences.conversations(user_id))
        self._recheck_if_unheard(conn, feed)
        if auth.cursors:
            self.resume(conn, auth.cursors)

    async def _reauth(self, conn: Connection, auth: frames.Auth) -> None:
        """A fresh token on an open socket: move its deadline, or refuse and close with 4001.

        Delivery goes on meanwhile. The token must be the socket's user's, and its session
        live; it may name another session of that user (a new login), which the socket then
        belongs to (its revocation closes it). Cursors in the frame are resumed as usual.
        """
        feed = self._feed()
        try:
            claims = await self._authenticate(auth.token)
        except InvalidToken as exc:
            if exc.reason == "expired":
                self._refuse(conn, "token_expired", "the new token has already expired")
            elif exc.reason == "revoked":
                self._refuse(conn, "unauthorized", "the session has ended")
            else:
                self._refuse(conn, "unauthorized", "invalid token")
            return
        except Exception:  # Redis/PostgreSQL down: keep the old deadline; the client retries
            log.warning("fanout.reauth_unavailable", exc_info=True)
            REAUTHS.labels("unavailable").inc()
            if conn.state == OPEN:
                conn.write_raw(frames.error("try_again", "could not check the token; resend it"))
            return
        if conn.state != OPEN:
            return
        if claims.user_id != conn.user_id:
            self._refuse(conn, "unauthorized", "token of another user")
            return
        session_id = claims.session_id
        if session_id in self._revoked:
            self._refuse(conn, "unauthorized", "the session has ended")
            return
        if session_id != conn.session_id:
            self._unbind_session(conn)
            conn.session_id = session_id
            self._by_session.setdefault(session_id, set()).add(conn)
        self.expiries.set(conn, self._deadline(claims))
        REAUTHS.labels("ok").inc()
        self._recheck_if_unheard(conn, feed)
        if auth.cursors:
            self.resume(conn, auth.cursors)

    def _refuse(self, conn: Connection, code: str, detail: str) -> None:
        """Refuse a re-authentication: an error frame, then 4001."""
        REAUTHS.labels("refused").inc()
        if conn.state == OPEN:
            conn.write_raw(frames.error(code, detail))
            self.close(conn, CLOSE_UNAUTHORIZED, code)

    def _unbind_session(self, conn: Connection) -> None:
        session = self._by_session.get(conn.session_id)  # type: ignore[arg-type]
        if session is not None:
            session.discard(conn)
            if not session:
                del self._by_session[conn.session_id]  # type: ignore[arg-type]

    async def _membership(self, user_id: uuid.UUID) -> set[uuid.UUID] | None:
        """The user's conversations as of the tail's position (None: already tracked here).

        The caller must not await between this returning and registering the socket.
        """
        for _ in range(3):
            if self.audiences.tracks(user_id):
                return None
            snapshot = await self._snapshots.load(user_id)
            await self.tail.reached(snapshot.positions, within=_BOOTSTRAP_WAIT)
            if self.audiences.tracks(user_id):
                return None
            if self.window.covers(snapshot.positions):
                conversations = set(snapshot.conversations)
                self.window.apply(user_id, conversations, snapshot.positions)
                return conversations
            # The read model is behind the start of the window: wait for the projector.
            await self._read_side.wait_applied(
                {(self._topic, p): o for p, o in self.window.horizon.items()},
                within=_BOOTSTRAP_WAIT,
            )
        raise Unavailable("the read model is too far behind the log")

    # --- resume ------------------------------------------------------------------------

    def resume(self, conn: Connection, cursors: Mapping[str, str]) -> None:
        """Start replaying what ``conn`` missed after each cursor (see module doc)."""
        assert conn.user_id is not None
        plans: list[ResumePlan] = []
        for raw_id, token in cursors.items():
            try:
                conversation_id = uuid.UUID(raw_id)
                position = Position.parse(token)
            except (ValueError, InvalidPosition):
                conn.violation("bad_cursor", f"not a conversation cursor: {raw_id[:40]}")
                continue
            if position.epoch != self.epoch:
                self.close(conn, CLOSE_EPOCH_CHANGED, "epoch changed; resync")
                return
            _, partition = stream_placement(conversation_id, self._partitions)
            if position.stream != "conversation" or position.partition != partition:
                conn.violation("bad_cursor", "cursor of another stream")
                continue
            if not self.audiences.is_member(conn.user_id, conversation_id):
                conn.write_raw(
                    frames.error("not_a_member", "not a member", conversation_id=conversation_id)
                )
                continue
            if conn.resuming is None:
                conn.resuming = {}
            if conversation_id in conn.resuming:
                continue
            conn.resuming[conversation_id] = []
            upto = min(conn.since.get(partition, 0), self.tail.offsets.get(partition, 0))
            plans.append(ResumePlan(conversation_id, partition, position.offset, upto))
        if plans:
            task = self._spawn(self._replay(conn, plans))
            self._replays.setdefault(conn, set()).add(task)
            task.add_done_callback(lambda done: self._replayed(conn, done))

    def _replayed(self, conn: Connection, task: asyncio.Task[None]) -> None:
        replays = self._replays.get(conn)
        if replays is not None:
            replays.discard(task)
            if not replays:
                del self._replays[conn]

    async def _replay(self, conn: Connection, plans: list[ResumePlan]) -> None:
        async def one(plan: ResumePlan) -> None:
            try:
                source, found = await self._history.missed(
                    plan.conversation_id, plan.partition, plan.after, plan.upto
                )
            except ResumeFailed:
                log.warning("fanout.resume_timed_out", conversation_id=str(plan.conversation_id))
                self.close(conn, CLOSE_INTERNAL, "resume failed; try again")
                return
            except Exception:  # Redis/Kafka trouble: close; the client retries
                log.warning("fanout.resume_failed", exc_info=True)
                self.close(conn, CLOSE_INTERNAL, "resume failed; try again")
                return
            RESUMES.labels(source).inc()
            await self._finish(conn, plan, found)

        await asyncio.gather(*(one(plan) for plan in plans))

    async def _finish(
        self, conn: Connection, plan: ResumePlan, found: list[tuple[int, bytes]]
    ) -> None:
        """Write the replay in steps as the socket drains, then, in one synchronous step, its
        last frames, the held-back ones and ``resynced``.

        A socket removed from the conversation meanwhile still gets all of it: its held
        frames end with the ``MemberLeft`` (it left the room in that step, so nothing later
        was held). Live frames of the conversation are held until the end, counted against
        ``queue_limit`` by :meth:`apply`.
        """
        step = max(4096, self.config.queue_limit // 4)
        last = plan.after
        out: list[bytes] = []
        size = 0
        for offset, data in found:
            if offset <= last:
                continue
            out.append(data)
            size += len(data)
            last = offset
            if size >= step:
                if not await self._write_step(conn, out):
                    return
                out, size = [], 0
        resuming = conn.resuming
        held = None if resuming is None else resuming.pop(plan.conversation_id, None)
        if held is None or conn.state != OPEN:
            return  # closed meanwhile
        if resuming is not None and not resuming:
            conn.resuming = None
        for offset, data in held:
            conn.held -= len(data)
            if offset > last:
                out.append(data)
                last = offset
        out.append(frames.resynced(plan.conversation_id))
        conn.send(out)

    async def _write_step(self, conn: Connection, out: list[bytes]) -> bool:
        """Write part of a replay; wait until the socket takes more. False: it is closed."""
        if conn.state != OPEN:
            return False
        conn.send(out)
        if conn.state != OPEN:
            return False
        if await conn.drained(self.config.replay_stall):
            return True
        if conn.state == OPEN:
            self.too_slow(conn)
        return False

    # --- the log -----------------------------------------------------------------------

    def apply(self, batch: Batch) -> None:
        """Deliver a batch of the tail: membership first, frames, then closes (log order)."""
        dirty: list[Connection] = []
        rooms = self.audiences.rooms
        delivered = 0
        now = time.time()
        for item in batch.items:
            if not isinstance(item, RecordedEvent):
                continue
            event = item.event
            if isinstance(event, ConversationEvent):
                conversation_id = event.conversation_id  # type: ignore[attr-defined]
                if isinstance(event, ConversationCreated | DirectConversationOpened | MemberJoined):
                    self._joined(item, conversation_id, now)
                room = rooms.get(conversation_id)
                if room:
                    data = text_frame(frame(item))
                    offset = item.position.offset
                    for conn in room:
                        conn_resuming = conn.resuming
                        if conn_resuming is not None:
                            held = conn_resuming.get(conversation_id)
                            if held is not None:
                                held.append((offset, data))
                                conn.held += len(data)
                                if conn.over_limit():
                                    self.too_slow(conn)
                                continue
                        pending = conn.pending
                        if pending is None:
                            conn.pending = [data]
                            dirty.append(conn)
                        else:
                            pending.append(data)
                    delivered += len(room)
                    DELIVERY_LATENCY.observe(max(0.0, now - item.envelope.time.timestamp()))
                    _LOCAL.inc()
                else:
                    _NOBODY.inc()
                if isinstance(event, MemberLeft):
                    self._left(item, event, now)
            elif isinstance(event, SessionRevoked):
                self.revoke_session(event.session_id)
            elif isinstance(event, UserErased):
                for conn in list(self.audiences.sockets(event.user_id)):
                    self.close(conn, CLOSE_UNAUTHORIZED, "account erased")
        for conn in dirty:
            conn.flush()
        if delivered:
            DELIVERIES.inc(delivered)
        self.window.evict(now)

    def _joined(self, item: RecordedEvent, conversation_id: uuid.UUID, now: float) -> None:
        event = item.event
        users: Iterable[uuid.UUID]
        if isinstance(event, ConversationCreated):
            users = [m.user_id for m in event.members]
        elif isinstance(event, DirectConversationOpened):
            users = event.user_ids
        else:
            assert isinstance(event, MemberJoined)
            users = [event.user_id]
        position = item.position
        for user_id in users:
            self.window.record(
                Change(position.partition, position.offset, conversation_id, user_id, True, now)
            )
            self.audiences.join(conversation_id, user_id)

    def _left(self, item: RecordedEvent, event: MemberLeft, now: float) -> None:
        position = item.position
        self.window.record(
            Change(
                position.partition,
                position.offset,
                event.conversation_id,
                event.user_id,
                False,
                now,
            )
        )
        # A socket resuming the conversation keeps what it holds (the MemberLeft last): the
        # replay ends with it (see _finish); out of the room, nothing more is held for it.
        self.audiences.leave(event.conversation_id, event.user_id)

    # --- revocation, typing, presence --------------------------------------------------

    def revoke_session(self, session_id: uuid.UUID) -> None:
        self._revoked[session_id] = time.monotonic()
        for conn in list(self._by_session.get(session_id, ())):
            self.close(conn, CLOSE_UNAUTHORIZED, "session ended")

    def on_revocation(self, signal: RevocationSignal) -> None:
        self.revoke_session(signal.session_id)

    def _feed(self) -> int | None:
        """The revocation feed's generation while it is up (None: down; 0: no feed here)."""
        signals = self.signals
        if signals is None:
            return 0
        return signals.generation if signals.subscribed.is_set() else None

    def _recheck_if_unheard(self, conn: Connection, feed: int | None) -> None:
        """After a socket's session was checked: if the feed was not up throughout since
        then, a revocation may have gone unheard, so check the session again."""
        if feed is None or feed != self._feed():
            self._spawn(self._recheck([conn]))

    def on_subscribed(self) -> None:
        """The feed is (re)subscribed: re-check every open socket's session, since anything
        revoked while it was down was not heard (ingest's feed does the same for its cache)."""
        self._spawn(self._recheck(None))

    async def _recheck(self, only: list[Connection] | None) -> None:
        """Close the sockets (all open ones, or ``only``) whose session is no longer live.

        Retried until the session store answers: a revocation must not survive a gap.
        """
        slots = asyncio.Semaphore(_RECHECK_PARALLEL)

        async def live(session_id: uuid.UUID) -> bool:
            async with slots:
                return await self._sessions.is_session_active(session_id)

        while True:
            sessions = {
                c.session_id
                for c in (self.connections if only is None else only)
                if c.state == OPEN and c.session_id is not None
            }
            if not sessions:
                return
            ordered = list(sessions)
            try:
                answers = await asyncio.gather(*(live(s) for s in ordered))
            except Exception:  # Redis/PostgreSQL down: try again
                log.warning("fanout.session_recheck_failed", exc_info=True)
                await asyncio.sleep(_RECHECK_RETRY)
                continue
            ended = [s for s, ok in zip(ordered, answers, strict=True) if not ok]
            for session_id in ended:
                self.revoke_session(session_id)
            if ended:
                log.info("fanout.sessions_ended_during_feed_gap", count=len(ended))
            return

    def on_epoch(self, signal: EpochSignal) -> None:
        """The log was restored under a new epoch: every cursor is stale, every socket resyncs.

        The node then stops (``epoch_changed``) so that its supervisor restarts it against
        the new log: its tail positions belong to the old one.
        """
        if signal.epoch == self.epoch:
            return
        log.warning("fanout.epoch_changed", old=self.epoch, new=signal.epoch)
        self.draining = True
        for conn in list(self.connections):
            if conn.state == HEAD:
                conn.abandon()
            else:
                self.close(conn, CLOSE_EPOCH_CHANGED, "epoch changed; resync")
        self.epoch_changed.set()

    def typing(self, conn: Connection, conversation_id: uuid.UUID) -> None:
        user_id = conn.user_id
        assert user_id is not None
        if not self.audiences.is_member(user_id, conversation_id):
            conn.violation("not_a_member", "typing in a conversation you are not in")
            return
        now = time.monotonic()
        if conn.typing_at is None:
            conn.typing_at = {}
        last = conn.typing_at.get(conversation_id)
        if last is not None and now - last < self.config.typing_interval:
            return
        conn.typing_at[conversation_id] = now
        if self.signals is not None:
            self.signals.typing(conversation_id, user_id)

    def on_typing(self, signal: TypingSignal) -> None:
        room = self.audiences.rooms.get(signal.conversation_id)
        if not room:
            return
        data = frames.typing(signal.conversation_id, signal.user_id)
        for conn in list(room):
            if conn.user_id != signal.user_id:
                conn.send((data,))

    def on_presence(self, signal: PresenceSignal) -> None:
        audience: set[Connection] = set()
        rooms = self.audiences.rooms
        for conversation_id in signal.conversations:
            audience.update(rooms.get(conversation_id, ()))
        data = frames.presence(signal.user_id, signal.status)
        for conn in audience:
            if conn.user_id != signal.user_id:
                conn.send((data,))

    # --- housekeeping ------------------------------------------------------------------

    def sweep(self) -> None:
        """Close sockets past their deadline (auth, idle, token); forget old revocations.

        The upgrade and the ``auth`` frame are due ``auth_timeout`` after the accept
        (``started``), not after the last byte: a client that pings, or trickles its request
        head, must not hold a socket without authenticating. Only an open socket's idleness
        counts from its last byte.
        """
        self.expire(time.time())
        now = time.monotonic()
        auth_deadline = now - self.config.auth_timeout
        idle_deadline = now - self.config.idle_timeout
        for conn in list(self.connections):
            state = conn.state
            if state in (HEAD, AUTH) and conn.started < auth_deadline:
                if state == HEAD:
                    conn.abandon()
                else:
                    self.close(conn, CLOSE_UNAUTHORIZED, "no auth frame in time")
            elif state == OPEN and conn.last_seen < idle_deadline:
                self.close(conn, 1001, "idle")
        forget = now - _REVOKED_MEMORY
        for session_id in [s for s, at in self._revoked.items() if at < forget]:
            del self._revoked[session_id]
        self.window.evict(time.time())

    def expire(self, now: float) -> None:
        """Close the sockets whose token expired by ``now`` (Unix seconds): error, then 4001."""
        for conn in self.expiries.due(now):
            if conn.state == OPEN:
                TOKEN_EXPIRIES.inc()
                conn.write_raw(
                    frames.error(
                        "token_expired", "the access token expired; reconnect with a fresh one"
                    )
                )
                self.close(conn, CLOSE_UNAUTHORIZED, "token expired")

    def shutdown(self) -> None:
        """Tell every socket to reconnect elsewhere (1001 going away)."""
        self.draining = True
        if not self.connections:
            self.emptied.set()
        for conn in list(self.connections):
            if conn.state == HEAD:
                conn.abandon()
            else:
                self.close(conn, 1001, "server restarting; resume elsewhere")


def _abort(conn: Connection) -> None:
    if conn.transport is not None:
        conn.transport.abort()
