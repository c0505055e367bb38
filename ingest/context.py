"""What a request can reach: the app's long-lived clients (typed ``AppKey``s) and the caller."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from eventstore import EventStore, LogEnds, RecordedEvent, Settings
from eventstore.codec import uuid_text
from ingest.config import IngestConfig
from ingest.exports import Exports
from ingest.http import REQUEST_ID
from ingest.problems import ProblemError
from projectors.read import ReadSide
from schemas.events import Event

STORE = web.AppKey("store", EventStore)
REDIS = web.AppKey("redis", Redis)
READ = web.AppKey("read", ReadSide)
ENDS = web.AppKey("ends", LogEnds)
CONFIG = web.AppKey("config", IngestConfig)
SETTINGS_KEY = web.AppKey("settings", Settings)
EXPORTS = web.AppKey("exports", Exports)


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: a user's session (every scope) or an API key (its scopes only)."""

    user_id: uuid.UUID
    session_id: uuid.UUID | None = None
    scopes: frozenset[str] | None = None
    api_key_id: str | None = None

    def require_scope(self, scope: str) -> None:
        if self.scopes is not None and scope not in self.scopes:
            raise ProblemError("insufficient-scope", f"this operation needs the {scope} scope")


PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    """The authenticated caller, as the auth middleware set it (never on a public route)."""
    found: Principal | None = request.get(PRINCIPAL)
    if found is None:
        raise ProblemError("unauthorized", "send Authorization: Bearer <access token>")
    return found


async def append(
    request: web.Request, actor: uuid.UUID, events: Sequence[Event]
) -> list[RecordedEvent]:
    """Write ``events`` stamped with ``actor`` and the request id (their correlation id);
    return them once Kafka acknowledged them."""
    return await request.app[STORE].producer.append(
        events, actor=uuid_text(actor), correlation_id=request[REQUEST_ID]
    )
