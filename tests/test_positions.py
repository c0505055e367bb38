"""Positions and their opaque tokens."""

from __future__ import annotations

import pytest

from eventstore import InvalidPosition, Position


def test_token_round_trips() -> None:
    position = Position(3, "conversation", 7, 1042)
    assert position.token() == "3.c.7.1042"
    assert Position.parse(position.token()) == position
    assert Position.parse("1.u.0.0") == Position(1, "user", 0, 0)


@pytest.mark.parametrize(
    "token", ["", "1.c.1", "1.x.0.1", "a.c.0.1", "1.c.-1.5", "1.c.0.1 ", "1.c.0.1.2", "1;c;0;1"]
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidPosition):
        Position.parse(token)


def test_positions_compare_within_a_partition_only() -> None:
    """Offsets order one partition; other partitions or epochs are not comparable."""
    a, b = Position(1, "conversation", 2, 5), Position(1, "conversation", 2, 9)
    assert b.is_after(a)
    assert not a.is_after(b)
    with pytest.raises(InvalidPosition):
        a.is_after(Position(1, "conversation", 3, 1))
    with pytest.raises(InvalidPosition):
        a.is_after(Position(2, "conversation", 2, 1))
