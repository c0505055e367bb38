"""CloudEvents 1.0 structured JSON of a recorded event, and the fan-out frame carrying it.

On Kafka an event travels in binary mode (attributes in headers); clients get it in
structured mode: one JSON object with the attributes and the decoded ``data``. The
projectors (recent-history cache) and the fanout tier (live pushes) build frames with the
same function, so a resumed client receives byte-identical frames from either path.
Personal values of an erased subject appear as ``{"kind": "erased"}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from eventstore.codec import RecordedEvent
from schemas.envelope import format_time
from schemas.events import ConversationEvent

_JSON = msgspec.json.Encoder()


def structured(recorded: RecordedEvent) -> dict[str, Any]:
    """The event as a CloudEvents structured-mode JSON object (a dict ready to encode)."""
    envelope = recorded.envelope
    document: dict[str, Any] = {
        "specversion": envelope.specversion,
        "id": str(envelope.id),
        "source": envelope.source,
        "type": envelope.type,
        "subject": envelope.subject,
        "time": format_time(envelope.time),
        "datacontenttype": envelope.datacontenttype,
        "schemaversion": envelope.schemaversion,
    }
    for name in ("actor", "correlationid", "causationid"):
        value = getattr(envelope, name)
        if value is not None:
            document[name] = value
    document["data"] = msgspec.to_builtins(recorded.event)
    return document


def frame(recorded: RecordedEvent) -> bytes:
    """The WebSocket frame pushing a conversation event (``{"type": "event", ...}``)."""
    event = recorded.event
    if not isinstance(event, ConversationEvent):
        raise TypeError(f"{type(event).__name__} is not a conversation event")
    return _JSON.encode(
        {
            "type": "event",
            "conversation_id": str(event.stream_id),
            "position": recorded.position.token(),
            "event": structured(recorded),
        }
    )
