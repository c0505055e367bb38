"""When each socket's credentials run out: a timing wheel keyed by the token's expiry second.

Pure bookkeeping, no I/O and no timer per socket. A JWT's ``exp`` is a whole Unix second, so
sockets are kept in one bucket per deadline second (``buckets[t]``) and the seconds that have
a bucket in a min-heap. The hub's one-second sweep asks for everything :meth:`Expiries.due`
and closes it, which costs the expired sockets plus a heap pop per second that had any,
whatever the number of sockets held. Moving a socket (an in-band re-authentication) or
forgetting it (a close) is a set operation on its bucket; an emptied bucket is dropped at
once and its second left in the heap, to be skipped when it comes up (lazy deletion). A
second is in the heap at most once, and many sockets share one (tokens are minted with one
TTL), so the heap stays small.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Expiries(Generic[C]):
    def __init__(self) -> None:
        self._buckets: dict[int, set[C]] = {}
        self._seconds: list[int] = []
        """Min-heap of the seconds that had a bucket (some may have been emptied since)."""
        self._queued: set[int] = set()
        """The seconds in ``_seconds``, so that none is pushed twice."""
        self._at: dict[C, int] = {}

    def __len__(self) -> int:
        return len(self._at)

    def deadline(self, socket: C) -> int | None:
        return self._at.get(socket)

    def set(self, socket: C, deadline: int) -> None:
        """Expire ``socket`` at ``deadline`` (Unix seconds), replacing any earlier deadline."""
        if self._at.get(socket) == deadline:
            return
        self.discard(socket)
        self._at[socket] = deadline
        bucket = self._buckets.get(deadline)
        if bucket is None:
            self._buckets[deadline] = {socket}
            if deadline not in self._queued:
                self._queued.add(deadline)
                heapq.heappush(self._seconds, deadline)
        else:
            bucket.add(socket)

    def discard(self, socket: C) -> None:
        deadline = self._at.pop(socket, None)
        if deadline is None:
            return
        bucket = self._buckets[deadline]
        bucket.discard(socket)
        if not bucket:
            del self._buckets[deadline]

    def due(self, now: float) -> list[C]:
        """Remove and return every socket whose deadline is at or before ``now``."""
        expired: list[C] = []
        seconds = self._seconds
        while seconds and seconds[0] <= now:
            second = heapq.heappop(seconds)
            self._queued.discard(second)
            bucket = self._buckets.pop(second, None)
            if bucket:  # None: emptied meanwhile
                for socket in bucket:
                    del self._at[socket]
                expired.extend(bucket)
        return expired
