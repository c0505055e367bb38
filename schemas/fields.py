"""Field types with their limits: the limits are part of the schema, checked on decode.

Every length here is in Unicode code points (what msgspec measures). Ingest validates command
bodies with the same annotated types, so a value that fits a command always fits its event.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec

Id = uuid.UUID

USERNAME_MIN, USERNAME_MAX = 3, 32
EMAIL_MAX = 254  # RFC 5321 path limit
DISPLAY_NAME_MAX = 64
STATUS_TEXT_MAX = 140
CONVERSATION_NAME_MAX = 128
DESCRIPTION_MAX = 1024
MESSAGE_BODY_MAX = 4000
CLIENT_MSG_ID_MAX = 64
EMOJI_MAX = 32
FILENAME_MAX = 255
CONTENT_TYPE_MAX = 127
MEDIA_SIZE_MAX = 100 * 1024 * 1024  # 100 MiB
SETTINGS_MAX_KEYS = 32
SETTING_KEY_MAX = 64
SETTING_VALUE_MAX = 256
DEVICE_MAX = 256
GROUP_MEMBERS_MAX = 1000

TEXT: str = r"^[^\x00]*$"
r"""The pattern of every free text: no NUL character. PostgreSQL's ``text`` and ``jsonb`` cannot
hold one, so a value with one could be stored nowhere: a command carrying it failed with a
server error, or (a message's body) was appended and then failed its projector's batch on
every restart, stopping its partition's read model.

The patterns are written for both Python (msgspec checks with ``re.search``) and the JSON
Schema of the OpenAPI document (ECMA-262, which has no ``\A`` or ``\Z``). In Python ``$`` also
matches before a final newline, so a pattern whose characters exclude newlines ends with
``$(?!\n)``: without it, ``"alice\n"`` was a username of its own beside ``"alice"``."""

Username = Annotated[
    str,
    msgspec.Meta(
        min_length=USERNAME_MIN,
        max_length=USERNAME_MAX,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$(?!\n)",
        description="Letters, digits, '_', '.', '-'; starts with a letter or digit.",
    ),
]
Email = Annotated[
    str,
    msgspec.Meta(
        min_length=3,
        max_length=EMAIL_MAX,
        pattern=r"^[^@\s\x00]+@[^@\s\x00]+$(?!\n)",
        description="An address with exactly one '@' and no white space or NUL.",
    ),
]
DisplayName = Annotated[str, msgspec.Meta(min_length=1, max_length=DISPLAY_NAME_MAX, pattern=TEXT)]
StatusText = Annotated[str, msgspec.Meta(max_length=STATUS_TEXT_MAX, pattern=TEXT)]
ConversationName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=CONVERSATION_NAME_MAX, pattern=TEXT)
]
Description = Annotated[str, msgspec.Meta(max_length=DESCRIPTION_MAX, pattern=TEXT)]
MessageBody = Annotated[str, msgspec.Meta(min_length=1, max_length=MESSAGE_BODY_MAX, pattern=TEXT)]
ClientMsgId = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=CLIENT_MSG_ID_MAX, pattern=r"^[\x21-\x7e]+$(?!\n)"),
]
Emoji = Annotated[str, msgspec.Meta(min_length=1, max_length=EMOJI_MAX, pattern=TEXT)]
Filename = Annotated[str, msgspec.Meta(min_length=1, max_length=FILENAME_MAX, pattern=TEXT)]
ContentType = Annotated[
    str,
    msgspec.Meta(min_length=3, max_length=CONTENT_TYPE_MAX, pattern=r"^[\w.+-]+/[\w.+-]+$(?!\n)"),
]
MediaSize = Annotated[int, msgspec.Meta(ge=1, le=MEDIA_SIZE_MAX)]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$(?!\n)")]
Device = Annotated[str, msgspec.Meta(max_length=DEVICE_MAX, pattern=TEXT)]
SettingKey = Annotated[str, msgspec.Meta(min_length=1, max_length=SETTING_KEY_MAX, pattern=TEXT)]
SettingValue = (
    bool
    | int
    | float
    | Annotated[str, msgspec.Meta(max_length=SETTING_VALUE_MAX, pattern=TEXT)]
    | None
)
Settings = Annotated[dict[SettingKey, SettingValue], msgspec.Meta(max_length=SETTINGS_MAX_KEYS)]

GlobalRole = Literal["user", "admin", "operator"]
MemberRole = Literal["owner", "admin", "member"]
MessageKind = Literal["text", "media"]
RevocationReason = Literal["logout", "refresh_reuse", "password_changed", "erased", "admin"]
