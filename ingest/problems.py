"""Errors as RFC 9457 problem details, in one place.

Handlers raise :class:`ProblemError` (or let a typed error from the event store escape); the
middleware turns every failure into ``application/problem+json`` with a stable ``type``, the
request id, and never a stack trace. Each ``type`` is a URN of this project, so clients can
switch on it without parsing titles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec
import structlog
from aiohttp import web

from schemas.api import Problem

log = structlog.get_logger(__name__)

PREFIX: Final = "urn:backbone:problem:"

# slug -> (status, title): the catalog. Adding is fine; renaming breaks clients.
CATALOG: Final[dict[str, tuple[int, str]]] = {
    "malformed-json": (400, "The body is not valid JSON"),
    "invalid-body": (422, "The body does not match the schema"),
    "invalid-parameter": (400, "A path or query parameter is invalid"),
    "unsupported-media-type": (415, "The body must be application/json"),
    "body-too-large": (413, "The body is larger than allowed"),
    "not-found": (404, "No such resource"),
    "method-not-allowed": (405, "The method is not allowed on this resource"),
    "unauthorized": (401, "Authentication is required"),
    "invalid-token": (401, "The token is invalid"),
    "invalid-credentials": (401, "The login or password is wrong"),
    "refresh-reuse": (401, "A spent refresh token was presented; the session is revoked"),
    "forbidden": (403, "Not allowed"),
    "insufficient-scope": (403, "The API key lacks the scope for this operation"),
    "taken": (409, "Already taken"),
    "conflict": (409, "The request conflicts with the current state"),
    "stale-epoch": (409, "The position is from another epoch of the log; resync"),
    "client-msg-id-reused": (409, "The client_msg_id was already used for another message"),
    "weak-password": (422, "The password does not meet the policy"),
    "upload-mismatch": (422, "The uploaded object does not match its declared size and hash"),
    "rate-limited": (429, "Too many requests"),
    "ip-blocked": (429, "Too many failed attempts from this address"),
    "log-unavailable": (503, "The event log cannot accept writes right now"),
    "dependency-unavailable": (503, "A dependency is unavailable"),
    "read-model-lagging": (503, "The read model has not caught up in time"),
    "internal": (500, "Internal error"),
}

_encoder = msgspec.json.Encoder()


class ProblemError(Exception):
    """Raise to answer with a problem of the catalog."""

    def __init__(
        self,
        slug: str,
        detail: str = "",
        *,
        errors: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if slug not in CATALOG:
            raise ValueError(f"unknown problem type {slug!r}")
        super().__init__(detail or slug)
        self.slug = slug
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return CATALOG[self.slug][0]


def problem_response(
    slug: str,
    detail: str = "",
    *,
    request_id: str | None = None,
    instance: str | None = None,
    errors: list[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    status, title = CATALOG[slug]
    body = Problem(
        type=PREFIX + slug,
        title=title,
        status=status,
        detail=detail,
        instance=instance,
        request_id=request_id,
        errors=errors,
    )
    return web.Response(
        status=status,
        body=_encoder.encode(body),
        content_type="application/problem+json",
        headers=headers,
    )


def from_problem(exc: ProblemError, request_id: str | None, path: str) -> web.Response:
    return problem_response(
        exc.slug,
        exc.detail,
        request_id=request_id,
        instance=path,
        errors=exc.errors,
        headers=exc.headers,
    )


HTTP_STATUS_SLUG: Final[dict[int, str]] = {
    400: "invalid-parameter",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
}
