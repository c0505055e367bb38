"""Request plumbing shared by every handler: ids, logging, metrics, problems, bodies.

One middleware stack wraps every route: it binds a request id (echoed in ``X-Request-Id``, and
stamped on every event the request writes as its correlation id), times the request per route
for Prometheus, and turns every failure into problem+json (never a stack trace).
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec
import redis.exceptions
import structlog
from aiohttp import web
from prometheus_client import Counter, Histogram

from eventstore import EventStoreError, KeyStoreUnavailable, RecordRejected, SubjectErased
from ingest.problems import HTTP_STATUS_SLUG, ProblemError, from_problem, problem_response

log = structlog.get_logger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)

REQUESTS = Counter(
    "backbone_http_requests_total",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "backbone_http_request_seconds",
    "HTTP request latency by route and method.",
    ["route", "method"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _request_id(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is short and plain, else a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= 64 and set(given) <= _REQUEST_ID_OK:
        return given
    return f"{_PROCESS_ID}{next(_serial):016x}"


# Fresh request ids: 64 random bits drawn once per process, then a counter (32 hex digits, as
# a UUID's). Unique across processes and restarts without a random draw (a system call) per
# request; they need not be unguessable, only distinct.
_PROCESS_ID = secrets.token_hex(8)
_serial = itertools.count()


def _new_process_id() -> None:
    global _PROCESS_ID
    _PROCESS_ID = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_process_id)  # a forked worker draws its own


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    route = _route_name(request)
    started = time.perf_counter()
    try:
        response = await _answer(request, handler, request_id)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    elapsed = time.perf_counter() - started
    method = request.method
    timer = _timers.get((route, method))
    if timer is None:
        timer = _timers[route, method] = LATENCY.labels(route, method)
    timer.observe(elapsed)
    status = response.status
    counter = _counters.get((route, method, status))
    if counter is None:
        counter = _counters[route, method, status] = REQUESTS.labels(route, method, str(status))
    counter.inc()
    response.headers["X-Request-Id"] = request_id
    return response


# The labelled children, looked up once: ``labels()`` validates, locks and builds its key on
# every call. One entry per child the metrics hold anyway (unmatched paths share one route).
_timers: dict[tuple[str, str], Any] = {}
_counters: dict[tuple[str, str, int], Any] = {}


async def _answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    path = request.path
    try:
        return await handler(request)
    except ProblemError as exc:
        return from_problem(exc, request_id, path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = HTTP_STATUS_SLUG.get(exc.status)
        if slug is None:
            return problem_response("internal", request_id=request_id, instance=path)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(slug, request_id=request_id, instance=path, headers=headers)
    except RecordRejected as exc:
        return problem_response("invalid-body", str(exc), request_id=request_id, instance=path)
    except SubjectErased as exc:
        return problem_response("conflict", str(exc), request_id=request_id, instance=path)
    except (
        KeyStoreUnavailable,
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
    ):
        log.warning("http.dependency_unavailable", path=path, exc_info=True)
        return problem_response(
            "dependency-unavailable",
            "a database is unreachable; nothing was accepted, retry shortly",
            request_id=request_id,
            instance=path,
            headers={"Retry-After": "2"},
        )
    except EventStoreError as exc:
        # Every other store error is the log refusing or failing a write: nothing was
        # acknowledged, so the client may retry (with the same client_msg_id).
        log.warning("http.log_unavailable", path=path, error=str(exc))
        return problem_response(
            "log-unavailable",
            "the event log did not acknowledge the write; nothing was accepted, retry shortly",
            request_id=request_id,
            instance=path,
            headers={"Retry-After": "1"},
        )
    except Exception:
        log.exception("http.unhandled", path=path)
        return problem_response("internal", request_id=request_id, instance=path)


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_body(raw: bytes, cls: type[T]) -> T:
    """Decode and validate a JSON body as ``cls``: 400 when not JSON, 422 when invalid."""
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        value: T = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProblemError("invalid-body", str(exc), errors=[str(exc)]) from None
    except msgspec.DecodeError as exc:
        raise ProblemError("malformed-json", str(exc)) from None
    return value


async def read_body(request: web.Request, cls: type[T]) -> T:
    """The request's JSON body as ``cls`` (the app's ``client_max_size`` bounds it: 413)."""
    content_type = request.headers.get("Content-Type", "application/json")
    if content_type.split(";", 1)[0].strip().lower() not in ("application/json", ""):
        raise ProblemError("unsupported-media-type", f"got {content_type[:60]!r}")
    return decode_body(await request.read(), cls)


_encoder = msgspec.json.Encoder()


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(body), content_type="application/json")


def path_uuid(request: web.Request, name: str) -> uuid.UUID:
    """A UUID path parameter; an unparsable one is a 404 (no such resource)."""
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        raise ProblemError("not-found", f"{name} is not a valid id") from None
