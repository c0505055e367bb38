"""The HTTP/1.1 side of a fanout socket: h11 reads the request, wsproto accepts the upgrade.

The port serves ``GET /v1/ws`` (the upgrade) and ``/healthz``, ``/readyz``, ``/metrics``.
Every connection starts with an ``h11`` server connection that reads one request head; it is
then either answered (through h11, with ``Connection: close``: no keep-alive, no pipelining)
or handed to wsproto, which checks the upgrade headers and writes the ``101`` answer. Only the
wsproto :class:`~wsproto.connection.Connection` outlives the handshake, which keeps an idle
socket small. This module adds what is policy rather than protocol: credentials in the URL
and a foreign ``Origin`` are refused, and permessage-deflate is never accepted.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import h11
import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WebSocket
from wsproto.events import AcceptConnection, RejectConnection
from wsproto.events import Request as UpgradeRequest
from wsproto.utilities import RemoteProtocolError

MAX_HEAD: Final = 8192
"""Longest request head accepted (request line and headers): past it, 431."""

_URL_CREDENTIALS: Final = frozenset({"token", "access_token", "jwt", "auth", "authorization"})


class HttpRefusal(Exception):
    """A request answered with an error status and closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RequestHead(msgspec.Struct, frozen=True):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Header names lower-cased; a repeated header keeps its last value."""

    @classmethod
    def from_h11(cls, request: h11.Request) -> RequestHead:
        split = urlsplit(request.target.decode("latin-1"))
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
        return cls(request.method.decode("latin-1"), split.path, split.query, headers)


def http_server() -> h11.Connection:
    """The parser a new connection reads its request head with."""
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)


def check_upgrade(head: RequestHead, origins: Collection[str]) -> None:
    """Refuse (:class:`HttpRefusal`) an upgrade request that our policy does not allow.

    Credentials in the URL are refused outright (they end up in proxy and access logs), even
    if the rest of the request is fine. A browser always sends ``Origin``; one that is not
    configured is refused (cross-site WebSocket hijacking). Non-browser clients send none.
    A plain request to the WebSocket path is told to upgrade (426); the upgrade headers
    themselves are wsproto's to check (:func:`accept`).
    """
    if head.method != "GET":
        raise HttpRefusal(405, "GET only")
    if any(name.lower() in _URL_CREDENTIALS for name, _ in parse_qsl(head.query, True)):
        raise HttpRefusal(
            400, "credentials in the URL are refused; authenticate in the first frame"
        )
    origin = head.headers.get("origin")
    if origin is not None and "*" not in origins and origin not in origins:
        raise HttpRefusal(403, "origin not allowed")
    if "upgrade" not in head.headers:
        raise HttpRefusal(426, "WebSocket upgrade required")


def accept(request: h11.Request) -> tuple[bytes, WebSocket]:
    """wsproto's ``101`` answer to an upgrade request h11 has read, and the open connection.

    wsproto validates the request (``Connection``, ``Upgrade``, version 13, the key) and
    computes ``Sec-WebSocket-Accept``; a request it rejects is :class:`HttpRefusal` with the
    status it suggests (426 for another version, 400 otherwise). No extension is accepted.
    """
    handshake = WSConnection(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(request.headers), request.target)
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        raise HttpRefusal(status, str(exc)) from None
    if not any(isinstance(event, UpgradeRequest) for event in handshake.events()):
        raise HttpRefusal(400, "not a WebSocket upgrade")  # pragma: no cover - wsproto raises
    answer = handshake.send(AcceptConnection(extensions=[]))
    websocket = handshake.connection
    assert websocket is not None  # accepting is what opens it
    return answer, websocket


def response(
    http: h11.Connection, status: int, body: bytes, content_type: str = "application/json"
) -> bytes:
    """A complete response to the request ``http`` has read, announcing the close."""
    head = h11.Response(
        status_code=status,
        headers=[
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    return b"".join(
        http.send(event) or b"" for event in (head, h11.Data(data=body), h11.EndOfMessage())
    )


def refusal(http: h11.Connection, error: HttpRefusal) -> bytes:
    return response(http, error.status, msgspec.json.encode({"error": error.detail}))
