"""Who belongs to which conversation, as of a known log position.

A node learns a user's conversations when their first socket connects (a snapshot of the
read model) and keeps them current from the membership events of its live tail. The two
must meet exactly, or a join could be missed (no delivery) or a leave missed (a leak):

* :class:`Snapshots` reads a user's memberships *and* the read model's offsets in one
  repeatable-read transaction: the projector commits both together, so the snapshot is the
  membership exactly as of those offsets. Concurrent loads share one query (a connection
  storm after a node restart costs one round trip per batch of users, not per user).
* :class:`MembershipWindow` remembers the membership changes the tail saw recently. Once the
  tail has passed the snapshot's offsets, the changes at or after them are applied on top:
  the result is the membership as of the tail's position, and from then on the tail keeps it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Mapping

import msgspec

from eventstore import Pool

Offsets = dict[int, int]
"""Next offset per partition of the conversations topic."""


class Change(msgspec.Struct, frozen=True):
    partition: int
    offset: int
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    joined: bool
    at: float


class MembershipWindow:
    """The membership changes seen by the tail during the last ``span`` seconds.

    ``horizon[p]`` is the lowest offset of partition ``p`` from which the window is complete
    (where the tail started, then just past the last evicted change).
    """

    def __init__(self, span: float, start: Mapping[int, int]) -> None:
        self._span = span
        self.horizon: Offsets = dict(start)
        self._changes: deque[Change] = deque()
        self._by_user: dict[uuid.UUID, deque[Change]] = {}

    def record(self, change: Change) -> None:
        self._changes.append(change)
        self._by_user.setdefault(change.user_id, deque()).append(change)

    def evict(self, now: float) -> None:
        changes = self._changes
        while changes and changes[0].at < now - self._span:
            old = changes.popleft()
            mine = self._by_user[old.user_id]
            mine.popleft()
            if not mine:
                del self._by_user[old.user_id]
            self.horizon[old.partition] = max(self.horizon.get(old.partition, 0), old.offset + 1)

    def covers(self, positions: Mapping[int, int]) -> bool:
        """Whether every change at or after ``positions`` is still in the window."""
        return all(positions.get(p, 0) >= start for p, start in self.horizon.items())

    def apply(
        self, user_id: uuid.UUID, conversations: set[uuid.UUID], positions: Mapping[int, int]
    ) -> None:
        """Bring ``conversations`` (a snapshot at ``positions``) up to the tail's position."""
        for change in self._by_user.get(user_id, ()):
            if change.offset >= positions.get(change.partition, 0):
                if change.joined:
                    conversations.add(change.conversation_id)
                else:
                    conversations.discard(change.conversation_id)


class Snapshot(msgspec.Struct, frozen=True):
    conversations: frozenset[uuid.UUID]
    positions: Offsets


class Snapshots:
    """Batched, consistent reads of users' memberships from the read model (see module doc)."""

    def __init__(self, pool: Pool, topic: str) -> None:
        self._pool = pool
        self._topic = topic
        self._waiting: list[tuple[uuid.UUID, asyncio.Future[Snapshot]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def load(self, user_id: uuid.UUID) -> Snapshot:
        future: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
        self._waiting.append((user_id, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                found, positions = await self._query(list({u for u, _ in batch}))
            except Exception as exc:  # noqa: BLE001 - handed to every waiter, which decides
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for user_id, future in batch:
                if not future.done():
                    future.set_result(Snapshot(frozenset(found.get(user_id, ())), positions))

    async def _query(
        self, users: list[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, set[uuid.UUID]], Offsets]:
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(
                "SELECT user_id, conversation_id FROM chat.members WHERE user_id = ANY($1::uuid[])",
                users,
            )
            offsets = await conn.fetch(
                "SELECT partition, next_offset FROM chat.offsets WHERE topic = $1", self._topic
            )
        found: dict[uuid.UUID, set[uuid.UUID]] = {}
        for row in rows:
            found.setdefault(row["user_id"], set()).add(row["conversation_id"])
        return found, {row["partition"]: row["next_offset"] for row in offsets}
