"""Events on Kafka records, in CloudEvents 1.0 binary mode.

Writing: the envelope's attributes become ``ce_*`` headers, the payload (personal fields sealed
under the subject's data key) becomes the JSON record value, the stream id the record key.

Reading is split so that a whole batch needs one key-store round trip: :func:`parse_record`
reads headers and payload without keys; :func:`needed_subjects` says whose keys a batch needs;
:func:`finish` unseals, upcasts and validates. A record whose type this reader does not know
is returned as :class:`Skipped` (and counted), never raised: newer writers may add types.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

import msgspec
from aiokafka.partitioner import murmur2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore.errors import DecodeError, InvalidEvent
from eventstore.keyring import (
    SUBJECT_BYTES,
    HeadKeys,
    KeyLookup,
    keys_by_head,
    seal,
    sealed_bytes,
    subject_of_head,
    unseal_bytes,
)
from eventstore.metrics import EVENTS_SKIPPED
from eventstore.positions import Position
from eventstore.topics import TopicLayout
from schemas.envelope import (
    CONTENT_TYPE,
    CONTENT_TYPE_HEADER,
    SPECVERSION,
    Envelope,
    format_time,
    parse_time,
)
from schemas.events import EVENT_TYPES, Event, MessageSent, StreamKind
from schemas.personal import ERASED, Erased
from schemas.upcasting import UPCASTERS, UpcastError, Upcasters

_JSON = msgspec.json.Encoder()
_ANY = msgspec.json.Decoder()
_DECODERS: dict[type[Event], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in EVENT_TYPES.values()
}
_UUID_TEXT = msgspec.json.Decoder(uuid.UUID)


class RecordLike(Protocol):
    """What the codec reads from a consumed record (aiokafka's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class OutgoingRecord(msgspec.Struct, frozen=True):
    """One encoded event, ready for the producer."""

    topic: str
    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    envelope: Envelope
    event: Event
    size: int
    """Bytes of key, value and headers: what counts against Kafka's request limit."""


class RecordedEvent(msgspec.Struct, frozen=True):
    """An event read from (or acknowledged by) the log, with its attributes and position."""

    envelope: Envelope
    event: Event
    position: Position


class Skipped(msgspec.Struct, frozen=True):
    """A record that yielded no event: an unknown type, or a poison record (with the error)."""

    position: Position
    reason: str
    type: str
    error: str
    headers: Sequence[tuple[str, bytes]]
    value: bytes | None


class ParsedRecord(msgspec.Struct):
    """A record whose headers and payload are read, but not yet unsealed or validated.

    A payload with personal fields is read one of two ways: ``typed``, the event itself with
    its personal fields still sealed (the sealed strings happened to fit the plaintexts'
    limits, as they nearly always do); otherwise ``payload``, the JSON object.
    """

    envelope: Envelope
    cls: type[Event]
    payload: dict[str, Any] | None
    raw: bytes
    position: Position
    headers: Sequence[tuple[str, bytes]]
    typed: Event | None = None
    sealed: tuple[tuple[str, str, bytes], ...] = ()
    """(field name, sealed value, its bytes) of each sealed personal value: the base64 is
    decoded once, by :func:`parse_record` for a ``typed`` record and by :func:`needed_subjects`
    for a ``payload``; the value is kept to tell whether an upcaster changed it since."""


Decoded = RecordedEvent | Skipped


class CompactSent(msgspec.Struct, frozen=True):
    """A ``MessageSent`` read by :func:`decode_compact`: the event as written (its body still
    sealed), the body's plaintext (``None`` once erased), its time and position, and the
    record's headers. No envelope is built: a build's projection reads only the time.
    :meth:`recorded` is the :class:`RecordedEvent` :func:`decode_records` makes of the record.
    The ids' ints are kept, as the apply loop keys rows by them (:data:`projectors.rows.Key`).
    """

    event: MessageSent
    body: str | None
    time: dt.datetime
    position: Position
    headers: Sequence[tuple[str, bytes]]
    conversation: int
    message: int
    sender: int

    def recorded(self) -> RecordedEvent:
        body = ERASED if self.body is None else self.body
        event = msgspec.structs.replace(self.event, body=body)
        return RecordedEvent(read_envelope(self.headers), event, self.position)


# --- writing -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def stream_placement(stream_id: uuid.UUID, partitions: int) -> tuple[bytes, int]:
    """A stream's record key and partition, as Kafka's default partitioner places it.

    ``(murmur2(key) & 0x7fffffff) % partitions`` is what the Java client and aiokafka compute
    for a keyed record; computing it once per stream (aiokafka's murmur2 is pure Python and
    costs microseconds per record) keeps placement identical and takes it off the hot path.
    The partition count comes from the topic layout, which provisioning keeps fixed.
    """
    key = str(stream_id).encode()
    return key, (murmur2(key) & 0x7FFFFFFF) % partitions


@functools.lru_cache(maxsize=1024)
def _time_header(time: dt.datetime) -> bytes:
    # Many events share a millisecond under load; formatting it once is measurably cheaper.
    return format_time(time).encode()


@functools.lru_cache(maxsize=1024)
def _constant_headers(
    specversion: str, source: str, type_: str, schemaversion: int, content_type: str
) -> tuple[tuple[tuple[str, bytes], ...], int]:
    # Spec version, source, type, schema version and content type repeat across events: one
    # cache lookup gives all five, and their size.
    headers = (
        ("ce_specversion", specversion.encode()),
        ("ce_source", source.encode()),
        ("ce_type", type_.encode()),
        ("ce_schemaversion", str(schemaversion).encode()),
        (CONTENT_TYPE_HEADER, content_type.encode()),
    )
    return headers, sum(len(name) + len(value) for name, value in headers)


def uuid_text(value: uuid.UUID) -> str:
    """``str(value)`` (the canonical form), formatted by msgspec in C: a few times cheaper than
    :class:`uuid.UUID`'s own ``__str__``, which matters once per event on the write path."""
    return _JSON.encode(value)[1:-1].decode()


def envelope_headers(envelope: Envelope) -> list[tuple[str, bytes]]:
    """The Kafka headers carrying an envelope (binary content mode)."""
    return _headers_and_size(envelope)[0]


def _headers_and_size(envelope: Envelope) -> tuple[list[tuple[str, bytes]], int]:
    """:func:`envelope_headers`, with their bytes counted as they are made (a sum over the
    list afterwards is a Python loop per record)."""
    (spec, source, type_, version, content_type), size = _constant_headers(
        envelope.specversion,
        envelope.source,
        envelope.type,
        envelope.schemaversion,
        envelope.datacontenttype,
    )
    event_id = _JSON.encode(envelope.id)[1:-1]
    subject = envelope.subject.encode()
    time = _time_header(envelope.time)
    headers = [
        spec,
        ("ce_id", event_id),
        source,
        type_,
        ("ce_subject", subject),
        ("ce_time", time),
        version,
        content_type,
    ]
    size += 22 + len(event_id) + len(subject) + len(time)  # 22: the three names
    for name, value in (
        ("ce_actor", envelope.actor),
        ("ce_correlationid", envelope.correlationid),
        ("ce_causationid", envelope.causationid),
    ):
        if value is not None:
            encoded = value.encode()
            headers.append((name, encoded))
            size += len(name) + len(encoded)
    return headers, size


def _holds_struct(info: msgspec.inspect.Type) -> bool:
    """Whether a value of this type may hold a Struct other than :class:`Erased`."""
    if isinstance(info, msgspec.inspect.StructType):
        return info.cls is not Erased
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_holds_struct(t) for t in info.types)
    if isinstance(info, msgspec.inspect.TupleType):
        return any(_holds_struct(t) for t in info.item_types)
    if isinstance(
        info,
        msgspec.inspect.VarTupleType
        | msgspec.inspect.ListType
        | msgspec.inspect.SetType
        | msgspec.inspect.FrozenSetType,
    ):
        return _holds_struct(info.item_type)
    if isinstance(info, msgspec.inspect.DictType):
        return _holds_struct(info.key_type) or _holds_struct(info.value_type)
    return False


def _checked_by_conversion(cls: type[Event]) -> bool:
    """Whether converting the attributes of a ``cls`` checks all of it: ``msgspec.convert``
    takes a nested Struct as it is, unchecked, so a class holding one is checked through JSON.
    (A personal field may hold :data:`~schemas.ERASED`, which no writer may write anyway.)"""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return not any(_holds_struct(field.type) for field in info.fields)


_BY_CONVERSION: Final = frozenset(c for c in EVENT_TYPES.values() if _checked_by_conversion(c))


def _check(event: Event) -> None:
    """Raise :class:`msgspec.ValidationError` unless ``event`` fits its schema, as a reader's
    typed decoder would judge it."""
    cls = type(event)
    if cls in _BY_CONVERSION:
        # Cheaper than the JSON round trip: the attributes are converted, and checked, as is.
        msgspec.convert(msgspec.structs.asdict(event), cls)
    else:
        _DECODERS[cls].decode(_JSON.encode(event))


def encode_event(
    event: Event, envelope: Envelope, keys: KeyLookup, layout: TopicLayout
) -> OutgoingRecord:
    """Validate ``event``, seal its personal fields and lay it out as a Kafka record.

    Validation checks what the typed decoders of readers check, so nothing that a reader would
    reject as poison can be written (msgspec Structs do not check limits on construction).
    """
    cls = type(event)
    for name in event.personal_fields:
        if not isinstance(getattr(event, name), str | None):
            raise InvalidEvent(f"{cls.__name__}.{name} is erased; cannot write it")
    try:
        _check(event)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"{cls.__name__}: {exc}") from None
    sealed = _sealed(event, envelope, keys) if event.personal_fields else None
    value = _JSON.encode(msgspec.structs.replace(event, **sealed) if sealed else event)
    record_key, partition = stream_placement(event.stream_id, layout.partitions(event.stream))
    headers, headers_size = _headers_and_size(envelope)
    return OutgoingRecord(
        topic=layout.topic(event.stream),
        partition=partition,
        key=record_key,
        value=value,
        headers=headers,
        timestamp_ms=int(envelope.time.timestamp() * 1000),
        envelope=envelope,
        event=event,
        size=len(record_key) + len(value) + headers_size,
    )


def _sealed(event: Event, envelope: Envelope, keys: KeyLookup) -> dict[str, str]:
    """The sealed form of each personal value of ``event`` that is not ``None``."""
    subject = event.subject_id
    assert subject is not None, f"{type(event).__name__} names no subject field"
    sealed: dict[str, str] = {}
    for name in event.personal_fields:
        text = getattr(event, name)
        if text is None:
            continue
        key = keys.get(subject)
        if key is None:
            raise ValueError(f"no data key was fetched for subject {subject}")
        sealed[name] = seal(key, subject, envelope.id, text)
    return sealed


# --- reading -----------------------------------------------------------------------------


_SPECVERSION = SPECVERSION.encode()
_VERSIONS: Final = {str(v).encode(): v for v in range(1, 100)}
_TEXTS: dict[bytes, str] = {}
_TEXTS_MAX: Final = 4096


def _text(raw: bytes) -> str:
    """A header value that recurs (source, type, content type): decoded once, then shared."""
    text = _TEXTS.get(raw)
    if text is None:
        text = raw.decode("utf-8", "replace")
        if len(_TEXTS) < _TEXTS_MAX:
            _TEXTS[raw] = text
    return text


def _event_id(raw: bytes) -> uuid.UUID:
    # msgspec parses the canonical forms in C; anything else (braces, a urn: prefix, garbage)
    # goes through uuid.UUID, which accepts or rejects it exactly as before. Only lengths of
    # the two canonical forms take the fast path, so no JSON escape can sneak through it.
    if len(raw) in (32, 36):
        try:  # not contextlib.suppress: on this path its set-up costs as much as the parse
            return _UUID_TEXT.decode(b'"' + raw + b'"')
        except msgspec.DecodeError:
            pass
    return uuid.UUID(raw.decode("utf-8", "replace"))


@functools.lru_cache(maxsize=8192)
def _event_time(raw: bytes) -> dt.datetime:
    # Events share their millisecond under load: each distinct time is parsed once.
    return parse_time(raw.decode("utf-8", "replace"))


def _schema_version(raw: bytes | None) -> int:
    if raw is None:
        return 1
    version = _VERSIONS.get(raw)
    return int(raw.decode("utf-8", "replace")) if version is None else version


def _optional(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace")


def read_envelope(headers: Iterable[tuple[str, bytes]]) -> Envelope:
    """Rebuild the envelope from a record's headers; :class:`DecodeError` if incomplete."""
    return _envelope(dict(headers))  # a repeated header: the last one counts


def _envelope(attrs: dict[str, bytes]) -> Envelope:
    """:func:`read_envelope` of the headers as a dictionary."""
    get = attrs.get
    found_type = get(CONTENT_TYPE_HEADER)
    content_type = CONTENT_TYPE if found_type is None else _text(found_type)
    try:
        if get("ce_specversion") != _SPECVERSION:
            found = get("ce_specversion")
            text = None if found is None else found.decode("utf-8", "replace")
            raise DecodeError(f"unsupported CloudEvents specversion {text!r}")
        return Envelope(
            id=_event_id(attrs["ce_id"]),
            source=_text(attrs["ce_source"]),
            type=_text(attrs["ce_type"]),
            subject=attrs["ce_subject"].decode("utf-8", "replace"),
            time=_event_time(attrs["ce_time"]),
            datacontenttype=content_type,
            schemaversion=_schema_version(get("ce_schemaversion")),
            actor=_optional(get("ce_actor")),
            correlationid=_optional(get("ce_correlationid")),
            causationid=_optional(get("ce_causationid")),
        )
    except KeyError as exc:
        raise DecodeError(f"missing CloudEvents header {exc.args[0]}") from None
    except (ValueError, OverflowError) as exc:  # a time past year 9999 in UTC overflows
        raise DecodeError(f"bad CloudEvents header: {exc}") from None


@functools.lru_cache(maxsize=256)
def _stream_of(layout: TopicLayout, topic: str) -> StreamKind:
    return layout.stream_of(topic)


def parse_record(
    record: RecordLike,
    layout: TopicLayout,
    epoch: int,
    attrs: dict[str, bytes] | None = None,
) -> ParsedRecord | Skipped:
    """Read a record's envelope and payload, without keys. Never raises for bad records.
    ``attrs``: the record's headers as a dictionary, if the caller made one."""
    position = Position(epoch, _stream_of(layout, record.topic), record.partition, record.offset)
    headers = record.headers or ()  # not copied: aiokafka's are a tuple, read only
    raw = record.value or b""
    event_type = ""
    try:
        envelope = _envelope(dict(headers) if attrs is None else attrs)
        event_type = envelope.type
        cls = EVENT_TYPES.get(event_type)
        if cls is None:
            EVENTS_SKIPPED.labels("unknown_type", event_type[:64]).inc()
            return Skipped(position, "unknown_type", event_type, "", headers, record.value)
        if envelope.datacontenttype != CONTENT_TYPE:
            raise DecodeError(f"unsupported content type {envelope.datacontenttype!r}")
        payload: dict[str, Any] | None = None
        if envelope.schemaversion == cls.version and cls.personal_fields:
            try:
                typed = _DECODERS[cls].decode(raw)
            except msgspec.ValidationError:
                pass  # a sealed value longer than its plaintext may be: read the JSON object
            else:
                sealed = _read_sealed(typed, cls.personal_fields)
                return ParsedRecord(envelope, cls, None, raw, position, headers, typed, sealed)
        if cls.personal_fields or envelope.schemaversion != cls.version:
            decoded = _ANY.decode(raw)
            if not isinstance(decoded, dict):
                raise DecodeError("payload is not a JSON object")
            payload = decoded
        return ParsedRecord(envelope, cls, payload, raw, position, headers)
    except (DecodeError, msgspec.DecodeError) as exc:
        EVENTS_SKIPPED.labels("poison", event_type[:64]).inc()
        return Skipped(position, "poison", event_type, str(exc), headers, record.value)


def needed_subjects(parsed: Iterable[ParsedRecord | Skipped]) -> set[uuid.UUID]:
    """Subjects whose keys are needed to unseal these records."""
    return {subject_of_head(head) for head in _needed_heads(parsed)}


def _needed_heads(parsed: Iterable[ParsedRecord | Skipped]) -> set[bytes]:
    """:func:`needed_subjects`, each subject as the 16 bytes that head its sealed values (a
    set of ``bytes`` is built in C; one of :class:`uuid.UUID` calls Python per value)."""
    heads: set[bytes] = set()
    for item in parsed:
        if not isinstance(item, ParsedRecord):
            continue
        if item.payload is not None:
            item.sealed = _read_sealed_payload(item.payload, item.cls.personal_fields)
        for _, _, opened in item.sealed:
            heads.add(opened[:SUBJECT_BYTES])
    return heads


def _read_sealed(typed: Event, names: tuple[str, ...]) -> tuple[tuple[str, str, bytes], ...]:
    """The sealed personal values of a typed event, read; :class:`DecodeError` for a value
    that is not one (the record is poison)."""
    found: tuple[tuple[str, str, bytes], ...] = ()
    for name in names:
        value = getattr(typed, name)
        if isinstance(value, str):
            found += ((name, value, sealed_bytes(value)),)
    return found


def _read_sealed_payload(
    payload: dict[str, Any], names: tuple[str, ...]
) -> tuple[tuple[str, str, bytes], ...]:
    """:func:`_read_sealed` of a JSON object, before any upcasting: a malformed value is left
    for :func:`finish` to report (an upcaster may yet replace it)."""
    found: tuple[tuple[str, str, bytes], ...] = ()
    for name in names:
        value = payload.get(name)
        if isinstance(value, str):
            try:
                found += ((name, value, sealed_bytes(value)),)
            except DecodeError:
                continue
    return found


def finish(
    parsed: ParsedRecord | Skipped, keys: KeyLookup, upcasters: Upcasters = UPCASTERS
) -> Decoded:
    """Unseal, upcast and validate a parsed record into a :class:`RecordedEvent`."""
    return _finish(parsed, keys_by_head(keys), upcasters)


def _finish(parsed: ParsedRecord | Skipped, keys: HeadKeys, upcasters: Upcasters) -> Decoded:
    """:func:`finish` with the keys looked up by their subjects' bytes (one batch's keys are
    turned into those once, not per record)."""
    if isinstance(parsed, Skipped):
        return parsed
    cls, envelope = parsed.cls, parsed.envelope
    try:
        if parsed.typed is not None:
            event = _unsealed(parsed.typed, envelope.id, parsed.sealed, keys)
        elif parsed.payload is None:
            event = _DECODERS[cls].decode(parsed.raw)
        else:
            payload = parsed.payload
            if envelope.schemaversion != cls.version:
                payload = upcasters.upcast(
                    envelope.type, envelope.schemaversion, cls.version, payload
                )
            read = {name: (value, opened) for name, value, opened in parsed.sealed}
            for name in cls.personal_fields:
                value = payload.get(name)
                if isinstance(value, str):
                    # Read again if an upcaster changed the value since it was read.
                    found = read.get(name)
                    if found is not None and found[0] == value:
                        raw = found[1]
                    else:
                        raw = sealed_bytes(value)
                    text = unseal_bytes(keys, envelope.id, raw)
                    payload[name] = text if isinstance(text, str) else {"kind": "erased"}
            event = msgspec.convert(payload, cls)
    except (DecodeError, UpcastError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        EVENTS_SKIPPED.labels("poison", envelope.type[:64]).inc()
        return Skipped(
            parsed.position, "poison", envelope.type, str(exc), parsed.headers, parsed.raw
        )
    return RecordedEvent(envelope, event, parsed.position)


def _unsealed(
    typed: Event, event_id: uuid.UUID, sealed: tuple[tuple[str, str, bytes], ...], keys: HeadKeys
) -> Event:
    """``typed`` with its sealed values (read by :func:`_read_sealed`) unsealed, each plaintext
    checked against its field's type."""
    if not sealed:
        return typed
    opened: dict[str, Any] = {}
    plain: dict[str, str] = {}
    for name, _, raw in sealed:
        text = opened[name] = unseal_bytes(keys, event_id, raw)
        if isinstance(text, str):
            plain[name] = text
    if plain:
        msgspec.convert(plain, _PERSONAL[type(typed)])
    return msgspec.structs.replace(typed, **opened)


def _personal_form(cls: type[Event]) -> type[msgspec.Struct]:
    """The personal fields of ``cls`` alone, with their types: what their plaintexts must fit."""
    fields = [(f.name, f.type, None) for f in msgspec.structs.fields(cls)]
    return msgspec.defstruct(
        f"Personal{cls.__name__}",
        [field for field in fields if field[0] in cls.personal_fields],
        kw_only=True,
        module=__name__,
    )


_PERSONAL: Final = {c: _personal_form(c) for c in EVENT_TYPES.values() if c.personal_fields}


async def decode_records(
    records: Sequence[RecordLike],
    layout: TopicLayout,
    epoch: int,
    keys_for_read: KeyFetcher,
    upcasters: Upcasters = UPCASTERS,
) -> list[Decoded]:
    """Decode a batch with one key lookup for all the subjects it needs."""
    parsed = [parse_record(r, layout, epoch) for r in records]
    heads = _needed_heads(parsed)
    keys = keys_by_head(await keys_for_read(map(subject_of_head, heads))) if heads else {}
    return [_finish(p, keys, upcasters) for p in parsed]


class KeyFetcher(Protocol):
    async def __call__(
        self, subjects: Iterable[uuid.UUID], /
    ) -> dict[uuid.UUID, AESGCM | None]: ...


_SENT_TYPE: Final = MessageSent.type_name().encode()
_SENT_VERSION: Final = str(MessageSent.version).encode()
_CONTENT_TYPE: Final = CONTENT_TYPE.encode()
_SENT_DECODER: Final = _DECODERS[MessageSent]
_SENT_PERSONAL: Final = _PERSONAL[MessageSent]


class _SentParsed(msgspec.Struct, frozen=True):
    """A ``MessageSent`` record read by :func:`decode_compact`'s first pass (keys not needed)."""

    record: RecordLike
    position: Position
    event_id: uuid.UUID
    time: dt.datetime
    event: MessageSent
    sealed: bytes


def _parse_sent(
    record: RecordLike, attrs: dict[str, bytes], layout: TopicLayout, epoch: int
) -> _SentParsed | None:
    """``record`` read for :func:`decode_compact`, if it is a ``MessageSent`` in the shape every
    writer gives it: the current schema version, every header the envelope requires, the
    content type named, a sealed body. ``None`` for anything else, which
    :func:`parse_record` reads instead (and judges exactly as for any record)."""
    if (
        attrs.get("ce_type") != _SENT_TYPE
        or attrs.get("ce_specversion") != _SPECVERSION
        or attrs.get(CONTENT_TYPE_HEADER) != _CONTENT_TYPE
        or attrs.get("ce_schemaversion") != _SENT_VERSION
        or "ce_source" not in attrs
        or "ce_subject" not in attrs
    ):
        return None
    try:
        event_id = _event_id(attrs["ce_id"])
        time = _event_time(attrs["ce_time"])
        event = _SENT_DECODER.decode(record.value or b"")
        if not isinstance(event.body, str):
            return None
        sealed = sealed_bytes(event.body)
    except (KeyError, ValueError, OverflowError, DecodeError):  # msgspec's: ValueErrors
        return None
    position = Position(epoch, _stream_of(layout, record.topic), record.partition, record.offset)
    return _SentParsed(record, position, event_id, time, event, sealed)


def _open_sent(parsed: _SentParsed, keys: HeadKeys) -> CompactSent | None:
    """The :class:`CompactSent` of ``parsed``, its body unsealed and checked as
    :func:`_unsealed` checks it; ``None`` if it does not unseal or fit (then
    :func:`decode_records`' path reads the record, and makes it poison)."""
    try:
        text = unseal_bytes(keys, parsed.event_id, parsed.sealed)
        if isinstance(text, str):
            msgspec.convert({"body": text}, _SENT_PERSONAL)
    except (DecodeError, msgspec.ValidationError):
        return None
    event = parsed.event
    return CompactSent(
        event,
        text if isinstance(text, str) else None,
        parsed.time,
        parsed.position,
        parsed.record.headers,
        event.conversation_id.int,
        event.message_id.int,
        event.sender_id.int,
    )


async def decode_compact(
    records: Sequence[RecordLike],
    layout: TopicLayout,
    epoch: int,
    keys_for_read: KeyFetcher,
    upcasters: Upcasters = UPCASTERS,
) -> list[Decoded | CompactSent]:
    """:func:`decode_records` for a build, which reads most of a log's records, the sent
    messages, as :class:`CompactSent`: no envelope, parsed record or recorded event per
    message, nor a second pass for its key. Every other record, and a ``MessageSent`` in any
    other shape or that does not unseal, is decoded exactly as :func:`decode_records` does
    (a test decodes a log both ways and compares)."""
    parsed: list[ParsedRecord | Skipped | _SentParsed] = []
    heads: set[bytes] = set()
    for record in records:
        attrs = dict(record.headers or ())
        sent = _parse_sent(record, attrs, layout, epoch)
        if sent is None:
            parsed.append(parse_record(record, layout, epoch, attrs))
        else:
            parsed.append(sent)
            heads.add(sent.sealed[:SUBJECT_BYTES])
    heads |= _needed_heads(p for p in parsed if not isinstance(p, _SentParsed))
    keys = keys_by_head(await keys_for_read(map(subject_of_head, heads))) if heads else {}
    decoded: list[Decoded | CompactSent] = []
    for item in parsed:
        if isinstance(item, _SentParsed):
            opened = _open_sent(item, keys)
            if opened is not None:
                decoded.append(opened)
                continue
            item = parse_record(item.record, layout, epoch)
        decoded.append(_finish(item, keys, upcasters))
    return decoded
