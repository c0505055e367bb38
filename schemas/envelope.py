"""The CloudEvents 1.0 envelope, and how it rides on a Kafka record in binary mode.

In binary mode the event's attributes travel as record headers named ``ce_<attribute>`` and
the record value is the payload alone (``content-type`` header: ``application/json``). The
header names and their order are fixed here; :mod:`eventstore.codec` builds and reads them.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid

import msgspec
import uuid_utils

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
DEFAULT_SOURCE = "urn:backbone"

# CloudEvents extension attributes (lower-case alphanumerics only, per the spec).
EXT_SCHEMA_VERSION = "schemaversion"
EXT_ACTOR = "actor"
EXT_CORRELATION = "correlationid"
EXT_CAUSATION = "causationid"

HEADER_PREFIX = "ce_"
CONTENT_TYPE_HEADER = "content-type"


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """CloudEvents context attributes of one event (everything but the data)."""

    id: uuid.UUID
    source: str
    type: str
    subject: str
    time: dt.datetime
    specversion: str = SPECVERSION
    datacontenttype: str = CONTENT_TYPE
    schemaversion: int = 1
    actor: str | None = None
    correlationid: str | None = None
    causationid: str | None = None


_UUID_JSON = msgspec.json.Decoder(uuid.UUID)
_JSON = msgspec.json.Encoder()


def new_event_id() -> uuid.UUID:
    """A fresh UUIDv7: time-ordered, so ids sort roughly by creation.

    Made by uuid-utils and turned into a :class:`uuid.UUID` by msgspec's parser (in C): a
    fifth less than ``uuid_utils.compat.uuid7`` costs (0.96 against 1.23 µs), once per event
    written.
    """
    return _stdlib_uuid(uuid_utils.uuid7())


def name_based_id(namespace: uuid.UUID, name: str) -> uuid.UUID:
    """``uuid.uuid5(namespace, name)``, made in Rust by uuid-utils: a third of the standard
    library's cost (whose SHA-1 call is cheap, its ``UUID`` constructor not), once per send."""
    return _stdlib_uuid(uuid_utils.uuid5(_uu(namespace), name))


def _stdlib_uuid(value: uuid_utils.UUID) -> uuid.UUID:
    # Through its canonical text, parsed by msgspec in C: uuid.UUID's constructor is Python.
    return _UUID_JSON.decode(_JSON.encode(str(value)))


@functools.lru_cache(maxsize=64)
def _uu(namespace: uuid.UUID) -> uuid_utils.UUID:
    return uuid_utils.UUID(bytes=namespace.bytes)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_last_now: tuple[int, dt.datetime] = (0, _EPOCH)


def utc_now() -> dt.datetime:
    """The current time, UTC, millisecond precision (what the envelope records).

    Events of one millisecond share one (immutable) datetime object: under load many do, and
    building it is most of the cost.
    """
    global _last_now
    millis = time.time_ns() // 1_000_000
    last_millis, value = _last_now
    if millis != last_millis:
        value = _EPOCH + dt.timedelta(milliseconds=millis)
        _last_now = (millis, value)
    return value


def format_time(value: dt.datetime) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z``, as every tier prints times."""
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str) -> dt.datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime."""
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time without a zone offset: {value!r}")
    return parsed.astimezone(dt.UTC)
