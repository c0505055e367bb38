"""A dependency-free Kafka health probe: one Metadata request over a plain socket.

A broker is healthy for us when a client can fetch metadata from it and the response lists the
brokers we expect (a KRaft broker appears there only once the controller has unfenced it, so it
can host replicas). Speaking the protocol directly keeps the probe synchronous and independent of
any event loop: the stack is started from sync code, threads, and running asyncio tests alike.

Metadata v4 is used because Kafka 4 dropped v0-v3 (KIP-896) and v4 is the newest version that
still uses the classic (non-flexible) encoding, which needs no varints.
"""

from __future__ import annotations

import socket
import struct

from ops.stack.layout import LOOPBACK

API_METADATA = 3
METADATA_VERSION = 4
CLIENT_ID = b"backbone-stack-probe"


class _Reader:
    """Sequential decoding of a Kafka response body."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return int(value)

    def skip_string(self) -> None:
        length = self.take(">h")
        self._pos += max(length, 0)  # -1 encodes a null string


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


def live_brokers(port: int, *, host: str = LOOPBACK, timeout: float = 2.0) -> set[int]:
    """Node ids of the brokers the broker at `host:port` reports as alive.

    Raises OSError (or struct.error on a garbled answer) when the broker does not serve yet.
    """
    correlation_id = 1
    header = struct.pack(">hhih", API_METADATA, METADATA_VERSION, correlation_id, len(CLIENT_ID))
    # An empty topic array asks for no topics (null would mean all); no auto-creation.
    body = struct.pack(">ib", 0, 0)
    request = header + CLIENT_ID + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != correlation_id:
        raise ConnectionError("unexpected correlation id in metadata response")
    reader.take(">i")  # throttle_time_ms
    nodes: set[int] = set()
    for _ in range(reader.take(">i")):
        nodes.add(reader.take(">i"))
        reader.skip_string()  # host
        reader.take(">i")  # port
        reader.skip_string()  # rack
    return nodes


def serves(port: int, expected: set[int]) -> bool:
    """Whether the broker on `port` answers metadata and sees every node in `expected`."""
    try:
        return expected <= live_brokers(port)
    except (OSError, struct.error):
        return False
