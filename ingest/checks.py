"""Checks of commands against projected state, with the read-your-writes slow path.

The fast path is a cache hit (the member's role in Redis). When the projected state says
"no" (not a member, no such message), the answer may only be stale: the refusal stands only
after the read model has applied the conversation's partition up to where the log ended when
the request arrived (bounded by ``projection_wait``). So a client that creates a group, or is
added to one, and posts at once, succeeds. The staleness window of a *positive* answer (a
member removed a moment ago can still post) is the projection lag, typically milliseconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from eventstore import stream_placement
from ingest.context import CONFIG, ENDS, READ, STORE
from ingest.problems import ProblemError
from projectors.read import MessageRef

T = TypeVar("T")


async def caught_up(request: web.Request, conversation_id: uuid.UUID) -> None:
    """Wait until the read model applied the conversation's partition up to the log end."""
    app = request.app
    store = app[STORE]
    topic = store.layout.topic("conversation")
    _, partition = stream_placement(conversation_id, store.settings.conversation_partitions)
    ends = await app[ENDS].end_offsets([(topic, partition)])
    if not await app[READ].wait_applied(ends, within=app[CONFIG].projection_wait):
        raise ProblemError(
            "read-model-lagging",
            "the read model is behind the log; retry shortly",
            headers={"Retry-After": "1"},
        )


async def settled(
    request: web.Request,
    conversation_id: uuid.UUID,
    fast: Callable[[], Awaitable[T | None]],
    slow: Callable[[], Awaitable[T | None]] | None = None,
) -> T | None:
    """``fast()``; when it finds nothing, wait for the read model, then ``slow()`` decides."""
    found = await fast()
    if found is not None:
        return found
    await caught_up(request, conversation_id)
    return await (slow or fast)()


async def member_role(request: web.Request, conversation_id: uuid.UUID, user_id: uuid.UUID) -> str:
    """The caller's role in the conversation; 404 for non-members (no existence leak)."""
    read = request.app[READ]
    role = await settled(
        request,
        conversation_id,
        lambda: read.member_role(conversation_id, user_id),
        lambda: read.member_role_db(conversation_id, user_id),
    )
    if role is None:
        raise ProblemError("not-found", "no such conversation")
    return role


async def fresh_role(request: web.Request, conversation_id: uuid.UUID, user_id: uuid.UUID) -> str:
    """The role as the read model has it once caught up with the log end as of now.

    A refusal on role (only an owner may ..., only an admin ...) waits for this: a promotion
    appended a moment ago may not be in the cache yet, and a refusal stands only once the
    model has seen everything the caller could have seen acknowledged."""
    await caught_up(request, conversation_id)
    role = await request.app[READ].member_role_db(conversation_id, user_id)
    if role is None:
        raise ProblemError("not-found", "no such conversation")
    return role


async def existing_message(
    request: web.Request, conversation_id: uuid.UUID, message_id: uuid.UUID
) -> MessageRef:
    read = request.app[READ]
    found = await settled(
        request, conversation_id, lambda: read.message(conversation_id, message_id)
    )
    if found is None:
        raise ProblemError("not-found", "no such message in this conversation")
    return found


async def conversation_kind(request: web.Request, conversation_id: uuid.UUID) -> str:
    read = request.app[READ]
    kind = await settled(request, conversation_id, lambda: read.conversation_kind(conversation_id))
    if kind is None:
        raise ProblemError("not-found", "no such conversation")
    return kind
