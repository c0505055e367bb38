"""CloudEvents 1.0 structured JSON of a recorded event, and the fan-out frame carrying it.

On Kafka an event travels in binary mode (attributes in headers); clients get it in
structured mode: one JSON object with the attributes and the decoded ``data``. The
projectors (recent-history cache) and the fanout tier (live pushes) build frames with the
same function, so a resumed client receives byte-identical frames from either path.
Personal values of an erased subject appear as ``{"kind": "erased"}``.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import msgspec

from eventstore.codec import RecordedEvent
from schemas.envelope import format_time
from schemas.events import ConversationEvent

_JSON = msgspec.json.Encoder()


@functools.lru_cache(maxsize=1024)
def _time_text(time: dt.datetime) -> str:
    # Events share their millisecond under load: each distinct time is formatted once.
    return format_time(time)


def _document(recorded: RecordedEvent) -> dict[str, Any]:
    """The structured-mode object with values msgspec encodes itself (UUIDs, the event):
    encoding it gives the same bytes as encoding :func:`structured`, without building the
    event's dict or formatting its UUIDs in Python first."""
    envelope = recorded.envelope
    document: dict[str, Any] = {
        "specversion": envelope.specversion,
        "id": envelope.id,
        "source": envelope.source,
        "type": envelope.type,
        "subject": envelope.subject,
        "time": _time_text(envelope.time),
        "datacontenttype": envelope.datacontenttype,
        "schemaversion": envelope.schemaversion,
    }
    for name in ("actor", "correlationid", "causationid"):
        value = getattr(envelope, name)
        if value is not None:
            document[name] = value
    document["data"] = recorded.event
    return document


def structured(recorded: RecordedEvent) -> dict[str, Any]:
    """The event as a CloudEvents structured-mode JSON object (plain values, ready to encode
    with any JSON library)."""
    document: dict[str, Any] = msgspec.to_builtins(_document(recorded))
    return document


def frame(recorded: RecordedEvent) -> bytes:
    """The WebSocket frame pushing a conversation event (``{"type": "event", ...}``)."""
    event = recorded.event
    if not isinstance(event, ConversationEvent):
        raise TypeError(f"{type(event).__name__} is not a conversation event")
    return _JSON.encode(
        {
            "type": "event",
            "conversation_id": event.stream_id,
            "position": recorded.position.token(),
            "event": _document(recorded),
        }
    )
