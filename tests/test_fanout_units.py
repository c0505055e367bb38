"""Pure pieces of the fanout tier: framing, audiences, the membership window."""

from __future__ import annotations

import os
import uuid

import pytest

from fanout.audiences import Audiences
from fanout.membership import Change, MembershipWindow
from fanout.wire import (
    OP_CLOSE,
    OP_TEXT,
    FrameParser,
    ProtocolError,
    accept_key,
    close_frame,
    text_frame,
)


def masked(payload: bytes, opcode: int = OP_TEXT, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    head = (
        bytes((first, 0x80 | length))
        if length < 126
        else bytes((first, 0xFE)) + length.to_bytes(2, "big")
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_accept_key_matches_rfc_6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_parser_unmasks_splits_and_reassembles() -> None:
    parser = FrameParser(1024)
    data = masked(b'{"type":"ping"}') + masked(b"ab", fin=False) + masked(b"cd", opcode=0, fin=True)
    assert parser.feed(data[:3]) == []
    assert parser.feed(data[3:]) == [(OP_TEXT, b'{"type":"ping"}'), (OP_TEXT, b"abcd")]


def test_parser_refuses_unmasked_and_oversized_frames() -> None:
    with pytest.raises(ProtocolError) as unmasked:
        FrameParser(1024).feed(text_frame(b"x"))
    assert unmasked.value.code == 1002
    with pytest.raises(ProtocolError) as big:
        FrameParser(16).feed(masked(b"x" * 200))
    assert big.value.code == 1009


def test_server_frames_are_plain_rfc_frames() -> None:
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert bytes((0x80 | OP_CLOSE, 2)) + (4008).to_bytes(2, "big") == close_frame(4008)
    assert text_frame(b"x" * 256)[:4] == b"\x81\x7e\x01\x00"


def test_audiences_follow_joins_and_leaves_of_local_users_only() -> None:
    audiences: Audiences[str] = Audiences()
    alice, bob, c1, c2 = (uuid.uuid4() for _ in range(4))
    assert audiences.add("a1", alice, [c1])
    assert not audiences.add("a2", alice, [c2])  # second socket: tracked set wins
    assert {"a1", "a2"} == audiences.rooms[c1]
    audiences.join(c2, alice)
    audiences.join(c2, bob)  # not on this node: nothing
    assert {"a1", "a2"} == audiences.rooms[c2]
    assert {"a1", "a2"} == audiences.leave(c1, alice)
    assert c1 not in audiences.rooms
    assert not audiences.remove("a1", alice)
    assert audiences.remove("a2", alice)
    assert audiences.rooms == {}
    assert not audiences.tracks(alice)


def test_window_brings_a_snapshot_up_to_the_tail() -> None:
    user, c1, c2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    window = MembershipWindow(60.0, {0: 10, 1: 5})
    window.record(Change(0, 12, c1, user, True, 100.0))
    window.record(Change(1, 7, c2, user, True, 100.0))
    window.record(Change(0, 14, c1, user, False, 101.0))
    assert not window.covers({0: 9, 1: 5})
    conversations = {c1}
    window.apply(user, conversations, {0: 13, 1: 5})  # join at 12 already in the snapshot
    assert {c2} == conversations
    window.evict(161.0)
    assert window.horizon == {0: 13, 1: 8}
    assert not window.covers({0: 12, 1: 8})
