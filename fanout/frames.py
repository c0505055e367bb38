"""The JSON frames of the WebSocket contract (API.md), decoded and encoded with msgspec.

Client frames are a tagged union on ``type``; anything else is malformed. Two extensions of
the contract (docs/ARCHITECTURE.md, "Fan-out"):

* ``auth`` may carry ``cursors``: resuming in the frame that subscribes makes the replay
  atomic with the subscription, so the missed events arrive strictly before live ones;
* ``auth`` may be sent again on an open socket with a fresh token of the same user, before
  the current one expires: the socket's deadline moves to the new token's ``exp`` and
  delivery goes on. Without it the socket gets ``token_expired`` and 4001 at expiry; a
  token of another user, invalid, expired or of an ended session gets an error and 4001.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Final

import msgspec

from fanout.wire import text_frame

MAX_CURSORS: Final = 2000

Cursors = Annotated[dict[str, str], msgspec.Meta(max_length=MAX_CURSORS)]


class Auth(msgspec.Struct, frozen=True, tag="auth", tag_field="type"):
    token: Annotated[str, msgspec.Meta(max_length=4096)]
    cursors: Cursors = msgspec.field(default_factory=dict)


class Resume(msgspec.Struct, frozen=True, tag="resume", tag_field="type"):
    cursors: Cursors


class Typing(msgspec.Struct, frozen=True, tag="typing", tag_field="type"):
    conversation_id: uuid.UUID


class Ping(msgspec.Struct, frozen=True, tag="ping", tag_field="type"):
    pass


ClientFrame = Auth | Resume | Typing | Ping

decode_client_frame = msgspec.json.Decoder(ClientFrame).decode
_encode = msgspec.json.Encoder().encode

PONG: Final = text_frame(b'{"type":"pong"}')


def ready(epoch: int, user_id: uuid.UUID) -> bytes:
    return text_frame(_encode({"type": "ready", "epoch": str(epoch), "user_id": str(user_id)}))


def resynced(conversation_id: uuid.UUID) -> bytes:
    return text_frame(_encode({"type": "resynced", "conversation_id": str(conversation_id)}))


def typing(conversation_id: uuid.UUID, user_id: uuid.UUID) -> bytes:
    return text_frame(
        _encode(
            {"type": "typing", "conversation_id": str(conversation_id), "user_id": str(user_id)}
        )
    )


def presence(user_id: uuid.UUID, status: str) -> bytes:
    return text_frame(_encode({"type": "presence", "user_id": str(user_id), "status": status}))


def error(code: str, detail: str, conversation_id: uuid.UUID | None = None) -> bytes:
    document = {"type": "error", "code": code, "detail": detail}
    if conversation_id is not None:
        document["conversation_id"] = str(conversation_id)
    return text_frame(_encode(document))
