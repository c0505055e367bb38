"""Positions: where an event sits in the log, and the opaque cursor strings clients hold.

A position is (topic, partition, offset) plus the log *epoch*. All events of one stream live in
one partition, so two positions of the same conversation compare by offset. The epoch changes
when the log is restored into a new cluster; a cursor from another epoch cannot be compared
with anything and the client must resync.

Token format (opaque to clients, stable for us): ``<epoch>.<stream letter>.<partition>.<offset>``
e.g. ``1.c.3.1042``. The stream letter names the topic by its role (``u`` users,
``c`` conversations), so tokens survive a topic-prefix change.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from schemas.events import StreamKind

_LETTER: Final[dict[StreamKind, str]] = {"user": "u", "conversation": "c"}
_KIND: Final[dict[str, StreamKind]] = {v: k for k, v in _LETTER.items()}
_TOKEN = re.compile(r"^(\d{1,9})\.([uc])\.(\d{1,6})\.(\d{1,19})$")


class InvalidPosition(ValueError):
    """A position token that does not parse."""


class Position(msgspec.Struct, frozen=True, order=True):
    """One event's place in the log. Orders by (epoch, stream, partition, offset)."""

    epoch: int
    stream: StreamKind
    partition: int
    offset: int

    def token(self) -> str:
        """The opaque string handed to clients."""
        return f"{self.epoch}.{_LETTER[self.stream]}.{self.partition}.{self.offset}"

    def __str__(self) -> str:
        return self.token()

    @classmethod
    def parse(cls, token: str) -> Position:
        """Parse a token produced by :meth:`token`; raise :class:`InvalidPosition` otherwise."""
        match = _TOKEN.match(token)
        if match is None:
            raise InvalidPosition(f"not a position: {token[:40]!r}")
        epoch, letter, partition, offset = match.groups()
        return cls(int(epoch), _KIND[letter], int(partition), int(offset))

    def is_after(self, other: Position) -> bool:
        """Whether this position comes later than ``other`` in the same partition and epoch."""
        if (self.epoch, self.stream, self.partition) != (
            other.epoch,
            other.stream,
            other.partition,
        ):
            raise InvalidPosition("positions of different partitions or epochs do not compare")
        return self.offset > other.offset
