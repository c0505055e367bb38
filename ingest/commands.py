"""Conversation, member and message commands: validate, authorize, append, answer.

Every command becomes exactly one event (or, on the batch path, one event per message) and is
answered only after Kafka acknowledged it, with the position it was written at. The
permission matrix these handlers enforce is documented in ``docs/permissions.md``.

Idempotent sends: a message's id is derived from (sender, ``client_msg_id``) (UUIDv5), so the
same pair always names the same message, across restarts of anything, without a write to any
database before the append. Redis remembers each send for ``SENT_TTL`` (its position, its
conversation and a digest of the rest of its request, see :func:`sent_record`), so a retry is
answered from it without appending again, and a send that reuses the id for another message
is refused (409 ``client-msg-id-reused``, see :func:`_remembered`) instead of being answered
as the first one's retry. Only if that memory is lost (or two requests race) can the log hold
the same message id twice; the read model and subscribers keep the first (documented in
API.md's terms: "ids let it drop duplicates").

That memory is written behind the answer, not before it: the 202 waits for Kafka's
acknowledgement (what makes the send durable), not for Redis. The record is queued before the
response is written and leaves with the next pipeline (a deferred command of
:mod:`ingest.autopipe`, at most ``DEFER_MS`` later), so a retry to the same process (which
needs the answer first, then a request of its own, whose admission queues behind the record)
finds it, and so does one to another process unless it comes within those milliseconds. Should
Redis refuse it, the send stays answered (it is in the log),
``backbone_ingest_sends_not_remembered_total`` counts it, and a retry of it appends a second
copy with the same ``message_id``, as above. Waiting for it had cost a third of a send's
latency at half the maximum rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import structlog
from aiohttp import web
from prometheus_client import Counter
from redis.asyncio import Redis

from eventstore import RecordedEvent
from eventstore.codec import uuid_text
from ingest import checks
from ingest.context import READ, STORE, Principal, append
from ingest.context import principal as principal_of
from ingest.http import json_response, path_uuid, read_body
from ingest.media import completed_by
from ingest.openapi import Operation
from ingest.problems import ProblemError
from ingest.security import AUTH, admit, guard
from schemas import (
    ConversationCreated,
    DirectConversationOpened,
    InitialMember,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageDeleted,
    MessageEdited,
    MessageSent,
    ReactionAdded,
    ReactionRemoved,
    ReadMarkerMoved,
)
from schemas.api import (
    Accepted,
    AddMemberBody,
    BatchAccepted,
    ConversationCreatedAnswer,
    CreateConversationBody,
    DirectBody,
    EditMessageBody,
    ReactionBody,
    ReadBody,
    RoleBody,
    SendBatchBody,
    SendMessageBody,
)
from schemas.envelope import name_based_id, new_event_id
from schemas.fields import Emoji

T = TypeVar("T")

MESSAGE_NAMESPACE = uuid.UUID("0b7e4d8a-52c3-5f19-a6e2-93d1c7f04e65")
"""UUIDv5 namespace of message ids, derived from (sender, client_msg_id)."""
SENT_TTL = 7 * 24 * 3600
"""How long Redis remembers a send for retries (seconds)."""
SENDS_NOT_REMEMBERED = Counter(
    "backbone_ingest_sends_not_remembered_total",
    "Acknowledged sends whose position Redis did not store (a retry would append them again).",
)

log = structlog.get_logger(__name__)


def message_id_for(sender_id: uuid.UUID, client_msg_id: str) -> uuid.UUID:
    """The id of the message ``sender_id`` sends as ``client_msg_id``: always the same one."""
    return name_based_id(MESSAGE_NAMESPACE, f"{uuid_text(sender_id)}:{client_msg_id}")


def sent_key(namespace: str, sender_id: uuid.UUID, client_msg_id: str) -> str:
    return f"{namespace}:sent:{uuid_text(sender_id)}:{client_msg_id}"


async def forget_sends(redis: Redis, namespace: str, sender_id: uuid.UUID) -> int:
    """Delete every send record of ``sender_id`` (erasure): they hold a digest of each message's
    content, which must not outlive the person's data key. Returns how many were deleted."""
    forgotten = 0
    pattern = sent_key(namespace, sender_id, "*")  # ids and prefixes hold no glob characters
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            forgotten += await redis.unlink(*batch)
            batch = []
    if batch:
        forgotten += await redis.unlink(*batch)
    return forgotten


def request_digest(body: SendMessageBody) -> str:
    """What a retry must repeat besides the conversation: kind, references and content, hashed.

    The fixed-form fields come first, so the content (free text) cannot shift them. 128 bits
    of SHA-256 (faster than BLAKE2b where the CPU accelerates it): about 1 µs for a short
    message, 20 µs for one of 4,000 non-ASCII characters.
    """
    refs = "".join(uuid_text(r) if r is not None else "-" for r in (body.reply_to, body.media_id))
    digest = hashlib.sha256(f"{body.kind}:{refs}:".encode())
    digest.update(body.content.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def sent_record(position: str, conversation_id: str, digest: str) -> str:
    """The value of a send's ``sent_key``: ``"<position> <conversation id> <request digest>"``.

    Records written before the conversation and the digest were kept hold the position alone
    (a position token has no space); :func:`_remembered` reads both.
    """
    return f"{position} {conversation_id} {digest}"


DIRECT_NAMESPACE = uuid.UUID("6f3b9d2e-0c41-5a7e-9b8d-2f1e4c6a8b10")
"""UUIDv5 namespace of direct conversation ids: the same pair always gets the same id."""


def direct_conversation_id(a: uuid.UUID, b: uuid.UUID) -> uuid.UUID:
    first, second = sorted((a, b))
    return uuid.uuid5(DIRECT_NAMESPACE, f"{first}:{second}")


def accepted(recorded: RecordedEvent, message_id: uuid.UUID | None = None) -> web.Response:
    return json_response(Accepted(position=recorded.position.token(), message_id=message_id), 202)


async def active_users(request: web.Request, user_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``user_ids`` are registered, active accounts (ingest's own synchronous store)."""
    rows = await request.app[STORE].pool.fetch(
        "SELECT user_id FROM ingest.accounts WHERE user_id = ANY($1::uuid[]) AND state = 'active'",
        list(user_ids),
    )
    return {row[0] for row in rows}


async def _some(found: Awaitable[T], good: Callable[[T], bool]) -> T | None:
    """``found``'s value when ``good``, else None (a refusal to be confirmed by the slow path)."""
    value = await found
    return value if good(value) else None


# --- conversations ---------------------------------------------------------------------------


async def create_conversation(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="conversations:write")
    body = await read_body(request, CreateConversationBody)
    others = list(dict.fromkeys(u for u in body.members if u != caller.user_id))
    if others:
        missing = set(others) - await active_users(request, others)
        if missing:
            raise ProblemError(
                "invalid-body",
                "unknown users in members",
                errors=[f"members: no such user {u}" for u in sorted(map(str, missing))],
            )
    event = ConversationCreated(
        conversation_id=new_event_id(),
        creator_id=caller.user_id,
        name=body.name,
        description=body.description,
        members=(
            InitialMember(caller.user_id, "owner"),
            *(InitialMember(u, "member") for u in others),
        ),
    )
    (recorded,) = await append(request, caller.user_id, [event])
    answer = ConversationCreatedAnswer(
        conversation_id=event.conversation_id, position=recorded.position.token()
    )
    return json_response(answer, 201)


async def open_direct(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="conversations:write")
    body = await read_body(request, DirectBody)
    if body.user_id == caller.user_id:
        raise ProblemError("invalid-body", "a direct conversation needs another user")
    if body.user_id not in await active_users(request, [body.user_id]):
        raise ProblemError("not-found", "no such user")
    conversation_id = direct_conversation_id(caller.user_id, body.user_id)
    read = request.app[READ]
    if await read.conversation_kind(conversation_id) is not None:
        return json_response(ConversationCreatedAnswer(conversation_id=conversation_id))
    pair = sorted((caller.user_id, body.user_id))
    event = DirectConversationOpened(
        conversation_id=conversation_id, user_ids=(pair[0], pair[1]), opened_by=caller.user_id
    )
    # Two racing opens both write; the read model keeps the first (the id is the same).
    (recorded,) = await append(request, caller.user_id, [event])
    answer = ConversationCreatedAnswer(
        conversation_id=conversation_id, position=recorded.position.token()
    )
    return json_response(answer)


async def _group_role(request: web.Request, caller: Principal, conversation_id: uuid.UUID) -> str:
    role = await checks.member_role(request, conversation_id, caller.user_id)
    if await checks.conversation_kind(request, conversation_id) == "direct":
        raise ProblemError("conflict", "a direct conversation's members cannot change")
    return role


async def _target_role(request: web.Request, conversation_id: uuid.UUID, target: uuid.UUID) -> str:
    read = request.app[READ]
    role = await checks.settled(
        request, conversation_id, lambda: read.member_role_db(conversation_id, target)
    )
    if role is None:
        raise ProblemError("not-found", "not a member")
    return role


async def add_member(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="conversations:write")
    conversation_id = path_uuid(request, "conversation_id")
    body = await read_body(request, AddMemberBody)
    role = await _group_role(request, caller, conversation_id)
    if role not in ("owner", "admin") or (body.role == "admin" and role != "owner"):
        role = await checks.fresh_role(request, conversation_id, caller.user_id)
    if role not in ("owner", "admin"):
        raise ProblemError("forbidden", "only an owner or admin adds members")
    if body.role == "admin" and role != "owner":
        raise ProblemError("forbidden", "only an owner adds admins")
    if body.user_id not in await active_users(request, [body.user_id]):
        raise ProblemError("not-found", "no such user")
    # The cache first: the projector writes it before it commits a batch, so a member added a
    # moment ago may be there (and post through it) before the row is; they are a member then.
    if await request.app[READ].member_role(conversation_id, body.user_id) is not None:
        raise ProblemError("conflict", "already a member")
    event = MemberJoined(
        conversation_id=conversation_id,
        user_id=body.user_id,
        role=body.role,
        added_by=caller.user_id,
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded)


async def remove_member(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="conversations:write")
    conversation_id = path_uuid(request, "conversation_id")
    target = path_uuid(request, "user_id")
    role = await _group_role(request, caller, conversation_id)
    if target == caller.user_id:
        if role == "owner":
            read = request.app[READ]
            others = await checks.settled(
                request,
                conversation_id,
                lambda: _some(read.owner_count(conversation_id), lambda n: n > 1),
            )
            if others is None:
                raise ProblemError(
                    "conflict", "the last owner cannot leave; make another owner first"
                )
    else:
        target_role = await _target_role(request, conversation_id, target)
        if not _may_remove(role, target_role):
            role = await checks.fresh_role(request, conversation_id, caller.user_id)
            target_role = await _target_role(request, conversation_id, target)
            if not _may_remove(role, target_role):
                raise ProblemError(
                    "forbidden", "an owner removes admins and members; an admin removes members"
                )
    event = MemberLeft(conversation_id=conversation_id, user_id=target, removed_by=caller.user_id)
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded)


def _may_remove(role: str, target_role: str) -> bool:
    """Who may remove whom (docs/permissions.md): never another owner, whom an owner cannot
    demote either; removing and adding back had been a demotion by another name."""
    if role == "owner":
        return target_role != "owner"
    return role == "admin" and target_role == "member"


async def change_role(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="conversations:write")
    conversation_id = path_uuid(request, "conversation_id")
    target = path_uuid(request, "user_id")
    body = await read_body(request, RoleBody)
    role = await _group_role(request, caller, conversation_id)
    if role != "owner":
        role = await checks.fresh_role(request, conversation_id, caller.user_id)
    if role != "owner":
        raise ProblemError("forbidden", "only an owner changes roles")
    if target == caller.user_id:
        raise ProblemError("conflict", "an owner cannot change their own role")
    target_role = await _target_role(request, conversation_id, target)
    if target_role == "owner":
        raise ProblemError("forbidden", "an owner's role cannot be changed")
    event = MemberRoleChanged(
        conversation_id=conversation_id, user_id=target, role=body.role, changed_by=caller.user_id
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded)


# --- messages --------------------------------------------------------------------------------


async def _check_message_body(
    request: web.Request, caller: Principal, conversation_id: uuid.UUID, body: SendMessageBody
) -> None:
    if body.kind == "media" and body.media_id is None:
        raise ProblemError("invalid-body", "a media message needs media_id")
    if body.kind == "text" and body.media_id is not None:
        raise ProblemError("invalid-body", "media_id needs type media")
    if body.media_id is not None and not await completed_by(request, body.media_id, caller.user_id):
        raise ProblemError("invalid-body", "media_id is not a completed upload of the sender")
    if body.reply_to is not None:
        await checks.existing_message(request, conversation_id, body.reply_to)


async def _send(
    request: web.Request,
    conversation_id: uuid.UUID,
    bodies: Sequence[SendMessageBody],
) -> list[Accepted]:
    """Append the messages not sent before; answer each with its (first) position.

    The hot path is one Redis round trip (session, rate limit, cached role, earlier sends)
    and one append; see the module doc for why message ids are derived, not stored.
    """
    if len({b.client_msg_id for b in bodies}) != len(bodies):
        raise ProblemError("invalid-body", "client_msg_id values repeat within the batch")
    namespace = request.app[STORE].settings.topic_prefix
    principal_id = principal_of(request).user_id
    keys = [sent_key(namespace, principal_id, b.client_msg_id) for b in bodies]
    admission = await admit(
        request,
        "message",
        scope="messages:write",
        cost=len(bodies),
        conversation_id=conversation_id,
        read_keys=keys,
    )
    caller = admission.caller
    if admission.role is None:  # not cached as a member: the slow path decides (or 404s)
        await checks.member_role(request, conversation_id, caller.user_id)
    for body in bodies:
        await _check_message_body(request, caller, conversation_id, body)
    conversation = uuid_text(conversation_id)
    answers: dict[str, Accepted] = {}
    events: list[MessageSent] = []
    pending: list[tuple[str, str]] = []
    for body, key, sent in zip(bodies, keys, admission.claims, strict=True):
        message_id = message_id_for(caller.user_id, body.client_msg_id)
        digest = request_digest(body)
        if sent is not None:  # a retry, or a refusal (raised before anything is appended)
            position = await _remembered(
                request, conversation_id, conversation, body, message_id, digest, sent
            )
            answers[body.client_msg_id] = Accepted(position=position, message_id=message_id)
            continue
        pending.append((key, digest))
        events.append(
            MessageSent(
                conversation_id=conversation_id,
                message_id=message_id,
                sender_id=caller.user_id,
                client_msg_id=body.client_msg_id,
                kind=body.kind,
                body=body.content,
                reply_to=body.reply_to,
                media_id=body.media_id,
            )
        )
    if events:
        recorded = await append(request, caller.user_id, events)
        autopipe = request.app[AUTH].autopipe
        for event, rec, (key, digest) in zip(events, recorded, pending, strict=True):
            token = rec.position.token()
            answers[event.client_msg_id] = Accepted(position=token, message_id=event.message_id)
            # Written behind the answer (see the module doc): queued before the response is,
            # it rides with the next pipeline, ahead of any retry's admission.
            record = sent_record(token, conversation, digest)
            autopipe.defer("SET", key, record, "EX", SENT_TTL).add_done_callback(_sent_recorded)
    return [answers[b.client_msg_id] for b in bodies]


async def _remembered(
    request: web.Request,
    conversation_id: uuid.UUID,
    conversation: str,
    body: SendMessageBody,
    message_id: uuid.UUID,
    digest: str,
    sent: bytes,
) -> str:
    """The position of the earlier send ``sent`` records, if this request is its retry.

    A ``client_msg_id`` names one message of its sender (its id is derived from the pair), so
    a send that reuses it is a retry only when it repeats the request: the same conversation,
    and the same kind, content, ``reply_to`` and ``media_id``. Anything else is another
    message, refused with 409 ``client-msg-id-reused`` (nothing appended), as an idempotency
    key reused with other parameters is (Stripe's stance): answering it with the first
    message's id and position had told the client a message was sent that never was. Retries
    resend the body they failed to get an answer for, so refusing changed content costs a
    correct client nothing; the comparison is of a digest kept in the same Redis record the
    admission already reads, so it costs no round trip.

    Records in the old format (the position alone, written before this check) carry neither:
    the read model decides whether that message is in this conversation (waiting for it to
    catch up before refusing, as other checks do). That costs a query, only for such records,
    which expire after ``SENT_TTL``; their content is not compared.
    """
    position, _, rest = sent.decode().partition(" ")
    if rest:
        earlier, _, earlier_digest = rest.partition(" ")
        if earlier != conversation:
            _reused(body, "in another conversation")
        if earlier_digest != digest:
            _reused(body, "for a different message (content, type, reply_to or media_id)")
        return position
    read = request.app[READ]
    found = await checks.settled(
        request, conversation_id, lambda: read.message(conversation_id, message_id)
    )
    if found is None:
        _reused(body, "in another conversation")
    return position


def _reused(body: SendMessageBody, how: str) -> NoReturn:
    raise ProblemError(
        "client-msg-id-reused",
        f"client_msg_id {body.client_msg_id} was already used {how};"
        " a retry must repeat its request, another message needs another client_msg_id",
    )


def _sent_recorded(stored: asyncio.Future[Any]) -> None:
    if stored.cancelled():
        return
    if (exc := stored.exception()) is not None:
        SENDS_NOT_REMEMBERED.inc()
        log.warning("ingest.send_not_remembered", error=f"{type(exc).__name__}: {exc}")


async def send_message(request: web.Request) -> web.Response:
    conversation_id = path_uuid(request, "conversation_id")
    body = await read_body(request, SendMessageBody)
    (answer,) = await _send(request, conversation_id, [body])
    return json_response(answer, 202)


async def send_batch(request: web.Request) -> web.Response:
    conversation_id = path_uuid(request, "conversation_id")
    body = await read_body(request, SendBatchBody)
    answers = await _send(request, conversation_id, body.messages)
    return json_response(BatchAccepted(items=tuple(answers)), 202)


async def edit_message(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    conversation_id = path_uuid(request, "conversation_id")
    message_id = path_uuid(request, "message_id")
    body = await read_body(request, EditMessageBody)
    await checks.member_role(request, conversation_id, caller.user_id)
    message = await checks.existing_message(request, conversation_id, message_id)
    if message.sender_id != caller.user_id:
        raise ProblemError("forbidden", "only the sender edits a message")
    if message.deleted:
        raise ProblemError("conflict", "the message is deleted")
    event = MessageEdited(
        conversation_id=conversation_id,
        message_id=message_id,
        editor_id=caller.user_id,
        body=body.content,
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded, message_id)


async def delete_message(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    conversation_id = path_uuid(request, "conversation_id")
    message_id = path_uuid(request, "message_id")
    role = await checks.member_role(request, conversation_id, caller.user_id)
    message = await checks.existing_message(request, conversation_id, message_id)
    if message.sender_id != caller.user_id and role not in ("owner", "admin"):
        role = await checks.fresh_role(request, conversation_id, caller.user_id)
        if role not in ("owner", "admin"):
            raise ProblemError("forbidden", "only the sender or an owner/admin deletes a message")
    if message.deleted:
        raise ProblemError("conflict", "the message is already deleted")
    event = MessageDeleted(
        conversation_id=conversation_id, message_id=message_id, deleted_by=caller.user_id
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded, message_id)


async def _reaction_target(request: web.Request, caller: Principal) -> tuple[uuid.UUID, uuid.UUID]:
    conversation_id = path_uuid(request, "conversation_id")
    message_id = path_uuid(request, "message_id")
    await checks.member_role(request, conversation_id, caller.user_id)
    message = await checks.existing_message(request, conversation_id, message_id)
    if message.deleted:
        raise ProblemError("conflict", "the message is deleted")
    return conversation_id, message_id


async def add_reaction(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    body = await read_body(request, ReactionBody)
    conversation_id, message_id = await _reaction_target(request, caller)
    event = ReactionAdded(
        conversation_id=conversation_id,
        message_id=message_id,
        user_id=caller.user_id,
        emoji=body.emoji,
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded, message_id)


async def remove_reaction(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    emoji: Emoji = request.match_info["emoji"]
    if not 1 <= len(emoji) <= 32:
        raise ProblemError("invalid-parameter", "emoji must be 1 to 32 characters")
    conversation_id, message_id = await _reaction_target(request, caller)
    event = ReactionRemoved(
        conversation_id=conversation_id, message_id=message_id, user_id=caller.user_id, emoji=emoji
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded, message_id)


async def move_read_marker(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    conversation_id = path_uuid(request, "conversation_id")
    body = await read_body(request, ReadBody)
    await checks.member_role(request, conversation_id, caller.user_id)
    await checks.existing_message(request, conversation_id, body.up_to)
    event = ReadMarkerMoved(
        conversation_id=conversation_id, user_id=caller.user_id, up_to=body.up_to
    )
    (recorded,) = await append(request, caller.user_id, [event])
    return accepted(recorded)


BASE = "/v1/conversations"
ONE = BASE + "/{conversation_id}"
MESSAGE = ONE + "/messages/{message_id}"

OPERATIONS = (
    Operation(
        method="POST",
        path=ONE + "/messages",
        handler=send_message,
        summary=(
            "Send a message; a retry with the same client_msg_id answers the same message,"
            " another message with it is refused (409 client-msg-id-reused)"
        ),
        status=202,
        body=SendMessageBody,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="POST",
        path=BASE,
        handler=create_conversation,
        summary="Create a group; the caller is its owner",
        status=201,
        body=CreateConversationBody,
        answer=ConversationCreatedAnswer,
    ),
    Operation(
        method="POST",
        path=BASE + "/direct",
        handler=open_direct,
        summary="Open (or find) the direct conversation with a user",
        body=DirectBody,
        answer=ConversationCreatedAnswer,
        problems=(404,),
    ),
    Operation(
        method="POST",
        path=ONE + "/members",
        handler=add_member,
        summary="Add a member (owner or admin; admins add members only)",
        status=202,
        body=AddMemberBody,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="DELETE",
        path=ONE + "/members/{user_id}",
        handler=remove_member,
        summary="Leave (yourself) or remove a member (owner; admin removes members)",
        status=202,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="PATCH",
        path=ONE + "/members/{user_id}",
        handler=change_role,
        summary="Change a member's role (owner only)",
        status=202,
        body=RoleBody,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="POST",
        path=ONE + "/messages:batch",
        handler=send_batch,
        summary="Send several messages in one request (each idempotent by client_msg_id)",
        status=202,
        body=SendBatchBody,
        answer=BatchAccepted,
        problems=(409,),
    ),
    Operation(
        method="PATCH",
        path=MESSAGE,
        handler=edit_message,
        summary="Edit a message (sender only)",
        status=202,
        body=EditMessageBody,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="DELETE",
        path=MESSAGE,
        handler=delete_message,
        summary="Delete a message (sender, owner or admin); its content is redacted",
        status=202,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="POST",
        path=MESSAGE + "/reactions",
        handler=add_reaction,
        summary="React to a message",
        status=202,
        body=ReactionBody,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="DELETE",
        path=MESSAGE + "/reactions/{emoji}",
        handler=remove_reaction,
        summary="Take a reaction back",
        status=202,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="POST",
        path=ONE + "/read",
        handler=move_read_marker,
        summary="Move the caller's read marker up to a message",
        status=202,
        body=ReadBody,
        answer=Accepted,
    ),
)
