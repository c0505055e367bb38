"""The read API's queries over the live read model (schema ``chat``), one statement each.

Every query is served by an index (see :mod:`projectors.tables`); pages of messages are keyed
by position (the offset within the conversation's partition), pages of conversations by last
activity. Each page reports the position the read model reflects for it, so a client can tell
whether its own write is already included (or wait for it with ``min_position``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from eventstore import Pool, Position, TopicLayout
from schemas.api import (
    ConversationItem,
    ConversationPage,
    MemberItem,
    MemberPage,
    MessageItem,
    MessagePage,
    Profile,
    ReactionCount,
)
from schemas.envelope import format_time

_MESSAGE_COLUMNS = (
    'message_id, conversation_id, sender_id, kind, body, partition, "offset", created_at,'
    " edited_at, deleted, reply_to, media_id"
)


class BadCursor(ValueError):
    """A cursor that this read model did not hand out."""


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else format_time(value)


class Reads:
    """Queries for one deployment (its topic layout and epoch name positions)."""

    def __init__(self, pool: Pool, layout: TopicLayout, epoch: int) -> None:
        self._pool = pool
        self._topic = layout.topic("conversation")
        self._epoch = epoch

    def _position(self, partition: int, offset: int) -> str:
        return Position(self._epoch, "conversation", partition, offset).token()

    def message_offset(self, token: str, partition: int) -> int:
        """The offset a message cursor points at; it must be of this conversation's partition."""
        try:
            position = Position.parse(token)
        except ValueError as exc:
            raise BadCursor(str(exc)) from None
        if position.epoch != self._epoch:
            raise BadCursor("the cursor is from another epoch of the log; resync")
        if position.stream != "conversation" or position.partition != partition:
            raise BadCursor("the cursor is not a position of this conversation")
        return position.offset

    async def reflected(self, partition: int) -> str | None:
        """The position the read model reflects for a conversation partition (None: nothing)."""
        applied: int | None = await self._pool.fetchval(
            "SELECT next_offset FROM chat.offsets WHERE topic = $1 AND partition = $2",
            self._topic,
            partition,
        )
        return None if not applied else self._position(partition, applied - 1)

    # --- messages --------------------------------------------------------------------------

    def _message(self, row: Any, reactions: dict[str, ReactionCount]) -> MessageItem:
        return MessageItem(
            message_id=row[0],
            conversation_id=row[1],
            sender_id=row[2],
            type=row[3],
            content=None if row[9] else row[4],
            position=self._position(row[5], row[6]),
            created_at=format_time(row[7]),
            edited_at=_time(row[8]),
            deleted=row[9],
            reply_to=row[10],
            media_id=row[11],
            reactions=reactions,
        )

    async def _reactions(
        self, message_ids: Sequence[uuid.UUID], viewer: uuid.UUID
    ) -> dict[uuid.UUID, dict[str, ReactionCount]]:
        if not message_ids:
            return {}
        rows = await self._pool.fetch(
            "SELECT message_id, emoji, count(*), bool_or(user_id = $2) FROM chat.reactions"
            " WHERE message_id = ANY($1::uuid[]) GROUP BY message_id, emoji"
            " ORDER BY message_id, emoji",
            list(message_ids),
            viewer,
        )
        found: dict[uuid.UUID, dict[str, ReactionCount]] = {}
        for row in rows:
            found.setdefault(row[0], {})[row[1]] = ReactionCount(count=row[2], me=row[3])
        return found

    async def messages(
        self,
        conversation_id: uuid.UUID,
        partition: int,
        viewer: uuid.UUID,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> MessagePage:
        """A page oldest first: after ``after``, or before ``before``, or the latest."""
        direction: Literal["ASC", "DESC"]
        if after is not None:
            bound, direction, args = 'AND "offset" > $2', "ASC", [after]
        elif before is not None:
            bound, direction, args = 'AND "offset" < $2', "DESC", [before]
        else:
            bound, direction, args = "", "DESC", []
        # The position first: the rows, read after it, hold at least what it says (read the
        # other way round, a batch committed in between made the page claim a message that
        # is not on it).
        reflected = await self.reflected(partition)
        rows = await self._pool.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM chat.messages"  # noqa: S608 - constant fragments
            f' WHERE conversation_id = $1 {bound} ORDER BY "offset" {direction}'
            f" LIMIT ${len(args) + 2}",
            conversation_id,
            *args,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        if direction == "DESC":
            rows.reverse()
        reactions = await self._reactions([r[0] for r in rows], viewer)
        items = [self._message(r, reactions.get(r[0], {})) for r in rows]
        older = more if direction == "DESC" else after is not None
        newer = more if direction == "ASC" else before is not None
        return MessagePage(
            items=items,
            prev=items[0].position if items and older else None,
            next=items[-1].position if items and newer else None,
            position=reflected,
        )

    async def message(self, message_id: uuid.UUID, viewer: uuid.UUID) -> MessageItem | None:
        row = await self._pool.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM chat.messages WHERE message_id = $1",  # noqa: S608
            message_id,
        )
        if row is None:
            return None
        reactions = await self._reactions([message_id], viewer)
        return self._message(row, reactions.get(message_id, {}))

    # --- conversations ---------------------------------------------------------------------

    def _conversation(self, row: Any, last: MessageItem | None) -> ConversationItem:
        return ConversationItem(
            conversation_id=row["conversation_id"],
            kind=row["kind"],
            name=row["name"],
            description=row["description"],
            role=row["role"],
            member_count=row["member_count"],
            created_at=format_time(row["created_at"]),
            last_message=last,
            unread_count=max(0, row["message_count"] - (row["up_to_seq"] or 0)),
        )

    _CONVERSATION_SELECT = """
        SELECT c.conversation_id, c.kind, c.name, c.description, c.member_count, c.created_at,
               c.message_count, c.last_message_id, c.last_activity_at, m.role, rm.up_to_seq
        FROM chat.members m
        JOIN chat.conversations c ON c.conversation_id = m.conversation_id
        LEFT JOIN chat.read_markers rm
               ON rm.conversation_id = m.conversation_id AND rm.user_id = m.user_id
    """

    async def _with_last(self, rows: Sequence[Any], viewer: uuid.UUID) -> list[ConversationItem]:
        last_ids = [r["last_message_id"] for r in rows if r["last_message_id"] is not None]
        last: dict[uuid.UUID, MessageItem] = {}
        if last_ids:
            found = await self._pool.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM chat.messages"  # noqa: S608 - constant
                " WHERE message_id = ANY($1::uuid[])",
                last_ids,
            )
            reactions = await self._reactions([r[0] for r in found], viewer)
            last = {r[0]: self._message(r, reactions.get(r[0], {})) for r in found}
        return [self._conversation(r, last.get(r["last_message_id"])) for r in rows]

    async def conversation(
        self, conversation_id: uuid.UUID, viewer: uuid.UUID
    ) -> ConversationItem | None:
        """The conversation as ``viewer`` sees it, or None when they are not a member."""
        row = await self._pool.fetchrow(
            self._CONVERSATION_SELECT + " WHERE m.user_id = $1 AND m.conversation_id = $2",
            viewer,
            conversation_id,
        )
        if row is None:
            return None
        (item,) = await self._with_last([row], viewer)
        return item

    async def conversations(
        self, viewer: uuid.UUID, *, cursor: str | None = None, limit: int = 50
    ) -> ConversationPage:
        """The viewer's conversations, most recently active first."""
        args: list[Any] = [viewer]
        bound = ""
        if cursor is not None:
            at, conversation_id = _decode_activity_cursor(cursor)
            bound = " AND (c.last_activity_at, c.conversation_id) < ($2, $3)"
            args += [at, conversation_id]
        rows = await self._pool.fetch(
            self._CONVERSATION_SELECT
            + " WHERE m.user_id = $1"
            + bound
            + " ORDER BY c.last_activity_at DESC, c.conversation_id DESC"
            + f" LIMIT ${len(args) + 1}",
            *args,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items = await self._with_last(rows, viewer)
        last = rows[-1] if rows else None
        return ConversationPage(
            items=items,
            next=_activity_cursor(last["last_activity_at"], last["conversation_id"])
            if more and last is not None
            else None,
            prev=None,
            position=None,
        )

    async def members(
        self, conversation_id: uuid.UUID, *, cursor: str | None = None, limit: int = 200
    ) -> MemberPage:
        after = _decode_id_cursor(cursor) if cursor else uuid.UUID(int=0)
        rows = await self._pool.fetch(
            "SELECT m.user_id, m.role, m.joined_at, u.username, u.display_name"
            " FROM chat.members m LEFT JOIN chat.users u ON u.user_id = m.user_id"
            " WHERE m.conversation_id = $1 AND m.user_id > $2 ORDER BY m.user_id LIMIT $3",
            conversation_id,
            after,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            MemberItem(
                user_id=r[0],
                role=r[1],
                joined_at=format_time(r[2]),
                username=r[3],
                display_name=r[4],
            )
            for r in rows
        ]
        return MemberPage(
            items=items,
            next=_id_cursor(rows[-1][0]) if more and rows else None,
            prev=None,
            position=None,
        )

    # --- users -----------------------------------------------------------------------------

    async def profile(self, user_id: uuid.UUID, *, private: bool = False) -> Profile | None:
        row = await self._pool.fetchrow(
            "SELECT user_id, username, display_name, status, role, erased, settings"
            " FROM chat.users WHERE user_id = $1",
            user_id,
        )
        if row is None:
            return None
        settings = msgspec.json.decode(row[6]) if private and row[6] is not None else None
        return Profile(
            user_id=row[0],
            username=row[1],
            display_name=row[2],
            status=row[3],
            role=row[4] if private else None,
            erased=row[5],
            settings=settings,
        )


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _unb64(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a cursor of this list") from None


def _activity_cursor(at: dt.datetime, conversation_id: uuid.UUID) -> str:
    return _b64(f"a|{at.isoformat()}|{conversation_id}")


def _decode_activity_cursor(token: str) -> tuple[dt.datetime, uuid.UUID]:
    parts = _unb64(token).split("|")
    if len(parts) != 3 or parts[0] != "a":
        raise BadCursor("not a cursor of this list")
    try:
        return dt.datetime.fromisoformat(parts[1]), uuid.UUID(parts[2])
    except ValueError:
        raise BadCursor("not a cursor of this list") from None


def _id_cursor(user_id: uuid.UUID) -> str:
    return _b64(f"u|{user_id}")


def _decode_id_cursor(token: str) -> uuid.UUID:
    kind, _, raw = _unb64(token).partition("|")
    if kind != "u":
        raise BadCursor("not a cursor of this list")
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BadCursor("not a cursor of this list") from None
