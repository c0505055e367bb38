"""Per-conversation audiences of one node: which local sockets receive a conversation.

Pure bookkeeping, no I/O. A *local user* is a user with at least one socket on this node;
their conversations are tracked here (kept current in log order by the tail) for as long
as they stay connected, so a second socket of the same user needs no lookup at all.
``rooms[c]`` holds every socket of every local member of ``c``: delivering an event is one
dictionary lookup and one loop over the sockets.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class Audiences(Generic[C]):
    def __init__(self) -> None:
        self.rooms: dict[uuid.UUID, set[C]] = {}
        self._sockets: dict[uuid.UUID, set[C]] = {}
        self._conversations: dict[uuid.UUID, set[uuid.UUID]] = {}

    def tracks(self, user_id: uuid.UUID) -> bool:
        return user_id in self._sockets

    def users(self) -> Iterable[uuid.UUID]:
        return self._sockets.keys()

    def sockets(self, user_id: uuid.UUID) -> set[C]:
        return self._sockets.get(user_id, set())

    def conversations(self, user_id: uuid.UUID) -> set[uuid.UUID]:
        return self._conversations.get(user_id, set())

    def is_member(self, user_id: uuid.UUID, conversation_id: uuid.UUID) -> bool:
        return conversation_id in self._conversations.get(user_id, ())

    def add(self, socket: C, user_id: uuid.UUID, conversations: Iterable[uuid.UUID]) -> bool:
        """Add a socket; ``conversations`` is used for the user's first socket only.

        True when this is the user's first socket on the node.
        """
        mine = self._sockets.get(user_id)
        first = mine is None
        if mine is None:
            mine = self._sockets[user_id] = set()
            self._conversations[user_id] = set(conversations)
        mine.add(socket)
        rooms = self.rooms
        for conversation_id in self._conversations[user_id]:
            room = rooms.get(conversation_id)
            if room is None:
                rooms[conversation_id] = {socket}
            else:
                room.add(socket)
        return first

    def remove(self, socket: C, user_id: uuid.UUID) -> bool:
        """Remove a socket; True when it was the user's last one (the user is untracked)."""
        mine = self._sockets.get(user_id)
        if mine is None or socket not in mine:
            return False
        mine.discard(socket)
        for conversation_id in self._conversations[user_id]:
            self._leave_room(conversation_id, (socket,))
        if mine:
            return False
        del self._sockets[user_id]
        del self._conversations[user_id]
        return True

    def join(self, conversation_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """A local user became a member (no-op for users not on this node)."""
        conversations = self._conversations.get(user_id)
        if conversations is None or conversation_id in conversations:
            return
        conversations.add(conversation_id)
        self.rooms.setdefault(conversation_id, set()).update(self._sockets[user_id])

    def leave(self, conversation_id: uuid.UUID, user_id: uuid.UUID) -> set[C]:
        """A local user stopped being a member; the sockets that left the room."""
        conversations = self._conversations.get(user_id)
        if conversations is None or conversation_id not in conversations:
            return set()
        conversations.discard(conversation_id)
        sockets = self._sockets[user_id]
        self._leave_room(conversation_id, sockets)
        return set(sockets)

    def _leave_room(self, conversation_id: uuid.UUID, sockets: Iterable[C]) -> None:
        room = self.rooms.get(conversation_id)
        if room is None:
            return
        room.difference_update(sockets)
        if not room:
            del self.rooms[conversation_id]
