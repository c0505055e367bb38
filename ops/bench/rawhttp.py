"""A lean HTTP/1.1 load client for latency benches: keep-alive sockets, pre-built requests.

aiohttp's client spends a few hundred microseconds of Python per request; at a thousand
requests a second on this 2-core machine the load generator then took a third of the CPU the
servers under test needed, and its queueing showed up as their latency. This client writes one
pre-formatted request per idle connection and parses only the status line and
``Content-Length`` of the answer (every response of the API carries one). One request at a
time per connection, a fixed pool: when all are busy a request waits for one, and that wait
is part of its measured time.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import cast
from urllib.parse import urlsplit

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class HttpError(RuntimeError):
    """The server answered with something this client does not parse (e.g. chunked)."""


class _Connection(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiting: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self._lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[: end + 2])
            match = _LENGTH.search(head)
            if match is None:
                raise HttpError(f"response without Content-Length: {head[:200]!r}")
            total = end + 4 + int(match.group(1))
            if len(self._buffer) < total:
                return
            body = bytes(self._buffer[end + 4 : total])
            del self._buffer[:total]
            status = int(head[9:12])
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result((status, body))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self.transport.write(data)
        return waiter


class RawHttpPool:
    """``size`` keep-alive connections to ``base`` (``http://host:port``)."""

    def __init__(self, base: str, size: int) -> None:
        parts = urlsplit(base)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._authority = f"{self._host}:{self._port}".encode()
        self._size = size
        self._idle: asyncio.Queue[_Connection] = asyncio.Queue()
        self._all: list[_Connection] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self._size):
            lost: asyncio.Future[None] = loop.create_future()
            _, conn = await loop.create_connection(
                lambda lost=lost: _Connection(lost),  # type: ignore[misc]
                self._host,
                self._port,
            )
            self._all.append(conn)
            self._idle.put_nowait(conn)

    def close(self) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()

    def post_json(self, path: str, body: bytes, token: str) -> bytes:
        """The bytes of a ``POST`` of ``body`` (JSON) to ``path`` with a bearer token."""
        return b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\nHost: ",
                self._authority,
                b"\r\nAuthorization: Bearer ",
                token.encode(),
                b"\r\nContent-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request`` on an idle connection; its status and body."""
        conn = await self._idle.get()
        try:
            return await conn.request(request)
        finally:
            self._idle.put_nowait(conn)
