"""The HTTP/1.1 side of the tier, sans I/O: parse one request head, answer it.

The fanout port speaks just enough HTTP for its five routes: ``GET /v1/ws`` (the upgrade),
``/healthz``, ``/readyz``, ``/metrics``. Every connection starts here and is either upgraded
or answered and closed; there is no keep-alive, body or pipelining, so a full HTTP stack
(and its per-connection objects, the dominant cost of an idle socket) is not needed.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import msgspec

from fanout.wire import accept_key

MAX_HEAD: Final = 8192
"""Longest request head accepted (request line and headers)."""

_REASONS: Final = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
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


def parse_head(raw: bytes) -> RequestHead:
    """Parse a request head (without the blank line); :class:`HttpRefusal` 400 if malformed."""
    try:
        text = raw.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise HttpRefusal(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise HttpRefusal(400, "HTTP/1.x only")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpRefusal(400, "malformed header")
        headers[name.lower()] = value.strip()
    split = urlsplit(target)
    return RequestHead(method, split.path, split.query, headers)


def check_upgrade(head: RequestHead, origins: Collection[str]) -> str:
    """Validate a WebSocket upgrade; the ``Sec-WebSocket-Key`` to answer, or :class:`HttpRefusal`.

    Credentials in the URL are refused outright (they end up in proxy and access logs), even
    if the rest of the request is fine. A browser always sends ``Origin``; one that is not
    configured is refused (cross-site WebSocket hijacking). Non-browser clients send none.
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
    if head.headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in {
        token.strip().lower() for token in head.headers.get("connection", "").split(",")
    }:
        raise HttpRefusal(426, "WebSocket upgrade required")
    if head.headers.get("sec-websocket-version") != "13":
        raise HttpRefusal(426, "WebSocket version 13 required")
    key = head.headers.get("sec-websocket-key", "")
    if len(key) != 24:
        raise HttpRefusal(400, "bad Sec-WebSocket-Key")
    return key


def upgrade_response(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode()


def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    """A complete response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def refusal(error: HttpRefusal) -> bytes:
    return response(error.status, msgspec.json.encode({"error": error.detail}))
