"""The read API (every GET of API.md), served by the ingest app from the projected read model.

Reads answer 404 to non-members (no existence leak). Any read takes ``?min_position=`` (a
position a command answered with): the read waits, bounded by ``BACKBONE_READ_WAIT_MAX``,
until the read model has applied it, so a client can read its own writes; if the model does
not catch up in time the answer is 503 ``read-model-lagging`` rather than silently stale data.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from eventstore import InvalidPosition, Position, stream_placement
from ingest import checks
from ingest.context import CONFIG, ENDS, READ, STORE, Principal
from ingest.http import json_response, path_uuid
from ingest.openapi import Operation
from ingest.problems import ProblemError
from ingest.security import guard
from projectors.read.queries import BadCursor, Reads
from schemas.api import ConversationItem, ConversationPage, MemberPage, MessagePage, Profile

READS = web.AppKey("reads", Reads)

LIMIT_MAX = 200


def _limit(request: web.Request, default: int = 50) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= LIMIT_MAX:
        raise ProblemError("invalid-parameter", f"limit must be an integer from 1 to {LIMIT_MAX}")
    return int(raw)


async def _min_position(request: web.Request) -> None:
    """Honour ``?min_position=``: wait (bounded) until the read model has applied it.

    A position the log does not hold (no such partition, or past the partition's end) is bad
    input, answered 400 at once: no wait would ever see it applied, and it had been answered
    503 after the whole wait. The log's end is asked only when the model has not applied the
    position yet (the slow path, which waits anyway): a position some command answered is
    always below it, as an acknowledged record is below the high watermark.
    """
    token = request.query.get("min_position")
    if token is None:
        return
    store = request.app[STORE]
    try:
        position = Position.parse(token)
    except InvalidPosition:
        raise ProblemError("invalid-parameter", "min_position is not a position") from None
    if position.epoch != store.epoch:
        raise ProblemError("stale-epoch", "the position is from another epoch of the log")
    if position.partition >= store.layout.partitions(position.stream):
        raise ProblemError("invalid-parameter", "min_position names no partition of the log")
    partition = (store.layout.topic(position.stream), position.partition)
    target = {partition: position.offset + 1}
    read = request.app[READ]
    if await read.wait_applied(target, within=0):
        return
    end = (await request.app[ENDS].end_offsets([partition]))[partition]
    if position.offset >= end:
        raise ProblemError("invalid-parameter", "min_position is past the end of the log")
    if not await read.wait_applied(target, within=request.app[CONFIG].read_wait_max):
        raise ProblemError(
            "read-model-lagging",
            "the read model has not reached min_position in time",
            headers={"Retry-After": "1"},
        )


async def _reader(request: web.Request) -> tuple[Principal, Reads]:
    caller = await guard(request, "read", scope="read")
    await _min_position(request)
    return caller, request.app[READS]


async def list_conversations(request: web.Request) -> web.Response:
    caller, reads = await _reader(request)
    try:
        page = await reads.conversations(
            caller.user_id, cursor=request.query.get("cursor"), limit=_limit(request)
        )
    except BadCursor as exc:
        raise ProblemError("invalid-parameter", str(exc)) from None
    return json_response(page)


async def get_conversation(request: web.Request) -> web.Response:
    caller, reads = await _reader(request)
    conversation_id = path_uuid(request, "conversation_id")
    await checks.member_role(request, conversation_id, caller.user_id)
    item = await reads.conversation(conversation_id, caller.user_id)
    if item is None:  # left between the check and the read
        raise ProblemError("not-found", "no such conversation")
    return json_response(item)


async def list_members(request: web.Request) -> web.Response:
    caller, reads = await _reader(request)
    conversation_id = path_uuid(request, "conversation_id")
    await checks.member_role(request, conversation_id, caller.user_id)
    try:
        page = await reads.members(
            conversation_id, cursor=request.query.get("cursor"), limit=_limit(request, 200)
        )
    except BadCursor as exc:
        raise ProblemError("invalid-parameter", str(exc)) from None
    return json_response(page)


async def list_messages(request: web.Request) -> web.Response:
    caller, reads = await _reader(request)
    conversation_id = path_uuid(request, "conversation_id")
    await checks.member_role(request, conversation_id, caller.user_id)
    _, partition = stream_placement(
        conversation_id, request.app[STORE].settings.conversation_partitions
    )
    before, after = request.query.get("before"), request.query.get("after")
    if before is not None and after is not None:
        raise ProblemError("invalid-parameter", "give before or after, not both")
    try:
        page = await reads.messages(
            conversation_id,
            partition,
            caller.user_id,
            before=reads.message_offset(before, partition) if before is not None else None,
            after=reads.message_offset(after, partition) if after is not None else None,
            limit=_limit(request),
        )
    except BadCursor as exc:
        raise ProblemError("invalid-parameter", str(exc)) from None
    return json_response(page)


async def _profile(request: web.Request, user_id: uuid.UUID, *, private: bool) -> web.Response:
    profile = await request.app[READS].profile(user_id, private=private)
    if profile is None:
        raise ProblemError("not-found", "no such user")
    return json_response(profile)


async def get_me(request: web.Request) -> web.Response:
    caller, _ = await _reader(request)
    return await _profile(request, caller.user_id, private=True)


async def get_user(request: web.Request) -> web.Response:
    await _reader(request)
    return await _profile(request, path_uuid(request, "user_id"), private=False)


_PAGE = (("limit", "integer", f"1..{LIMIT_MAX}"), ("cursor", "string", "from next/prev"))
_WAIT = (("min_position", "string", "wait until the read model reflects this position"),)

OPERATIONS = (
    Operation(
        method="GET",
        path="/v1/conversations",
        handler=list_conversations,
        summary="The caller's conversations, most recently active first",
        answer=ConversationPage,
        query=_PAGE + _WAIT,
    ),
    Operation(
        method="GET",
        path="/v1/conversations/{conversation_id}",
        handler=get_conversation,
        summary="A conversation and the caller's role in it",
        answer=ConversationItem,
        query=_WAIT,
    ),
    Operation(
        method="GET",
        path="/v1/conversations/{conversation_id}/members",
        handler=list_members,
        summary="Members with their roles",
        answer=MemberPage,
        query=_PAGE + _WAIT,
    ),
    Operation(
        method="GET",
        path="/v1/conversations/{conversation_id}/messages",
        handler=list_messages,
        summary="A page of messages, oldest first, before or after a position",
        answer=MessagePage,
        query=(
            ("before", "string", "a position"),
            ("after", "string", "a position"),
            ("limit", "integer", f"1..{LIMIT_MAX}"),
            *_WAIT,
        ),
    ),
    Operation(
        method="GET",
        path="/v1/users/me",
        handler=get_me,
        summary="The caller's own profile",
        answer=Profile,
        query=_WAIT,
        problems=(404,),
    ),
    Operation(
        method="GET",
        path="/v1/users/{user_id}",
        handler=get_user,
        summary="A user's public profile",
        answer=Profile,
        query=_WAIT,
    ),
)
