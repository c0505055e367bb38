"""The CloudEvents binary-mode codec, without servers: data keys are held in memory here."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore import InvalidEvent, Position, Skipped, TopicLayout
from eventstore.cloudevents import frame, structured
from eventstore.codec import (
    CompactSent,
    RecordedEvent,
    decode_compact,
    decode_records,
    encode_event,
    finish,
    needed_subjects,
    parse_record,
    stream_placement,
    uuid_text,
)
from eventstore.keyring import seal
from eventstore.metrics import EVENTS_SKIPPED
from schemas import ERASED, Envelope, Event, InitialMember, MessageSent, new_event_id, utc_now
from schemas.fields import MESSAGE_BODY_MAX
from tests.metrics_support import Series, added, series
from tests.samples import ALICE, BOB, PERSONAL_PLAINTEXTS, ROOM, sample_events

LAYOUT = TopicLayout("chat", 4, 8, 1, 1)
KEYS: dict[uuid.UUID, AESGCM | None] = {ALICE: AESGCM(AESGCM.generate_key(256))}


class Record(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]


def envelope(event: Event, **overrides: Any) -> Envelope:
    attrs: dict[str, Any] = {
        "id": new_event_id(),
        "source": "urn:test",
        "type": event.type_name(),
        "subject": str(event.stream_id),
        "time": utc_now(),
        "actor": str(ALICE),
        "correlationid": "req-1",
    }
    attrs.update(overrides)
    return Envelope(**attrs)


def written(event: Event, offset: int = 0, keys: dict[uuid.UUID, AESGCM | None] = KEYS) -> Record:
    out = encode_event(event, envelope(event), keys, LAYOUT)
    return Record(out.topic, 1, offset, out.value, out.headers)


def read(record: Record, keys: dict[uuid.UUID, AESGCM | None] = KEYS) -> RecordedEvent | Skipped:
    return finish(parse_record(record, LAYOUT, epoch=1), keys)


def test_every_event_round_trips_with_its_envelope() -> None:
    """encode -> Kafka record -> decode gives the same event, envelope and position."""
    for offset, event in enumerate(sample_events()):
        record = written(event, offset)
        decoded = read(record)
        assert isinstance(decoded, RecordedEvent), decoded
        assert decoded.event == event
        assert decoded.position == Position(1, event.stream, 1, offset)
        assert decoded.envelope.type == event.type_name()
        assert decoded.envelope.subject == str(event.stream_id)
        assert decoded.envelope.actor == str(ALICE)
        assert decoded.envelope.correlationid == "req-1"


def test_records_use_cloudevents_binary_mode_headers_and_stream_keys() -> None:
    event = sample_events()[10]
    out = encode_event(event, envelope(event), KEYS, LAYOUT)
    names = [name for name, _ in out.headers]
    for required in ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time"):
        assert required in names
    headers = dict(out.headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["content-type"] == b"application/json"
    assert headers["ce_schemaversion"] == b"1"
    assert out.key == str(ROOM).encode()
    assert out.topic == "chat.conversations"


def test_personal_fields_never_appear_in_clear_in_the_record() -> None:
    """Every personal value is sealed: no plaintext in the value or the headers."""
    for event in sample_events():
        out = encode_event(event, envelope(event), KEYS, LAYOUT)
        blob = out.value + b"".join(v for _, v in out.headers)
        for text in PERSONAL_PLAINTEXTS:
            assert text.encode() not in blob, (type(event).__name__, text)


def test_without_the_subjects_key_personal_fields_decode_as_erased() -> None:
    """Crypto-shredding: a destroyed key leaves the event readable but its personal data erased."""
    event = sample_events()[10]
    assert isinstance(event, MessageSent)
    decoded = read(written(event), keys={ALICE: None})
    assert isinstance(decoded, RecordedEvent)
    assert isinstance(decoded.event, MessageSent)
    assert decoded.event.body == ERASED
    assert decoded.event.message_id == event.message_id
    assert decoded.event.sender_id == ALICE


def test_a_batch_asks_for_each_needed_subject_once() -> None:
    parsed = [parse_record(written(e), LAYOUT, 1) for e in sample_events()]
    assert needed_subjects(parsed) == {ALICE}


def test_unknown_event_types_are_skipped_and_counted() -> None:
    record = written(sample_events()[2])
    record.headers = [(k, b"chat.future.thing" if k == "ce_type" else v) for k, v in record.headers]
    before = EVENTS_SKIPPED.labels("unknown_type", "chat.future.thing")._value.get()
    decoded = read(record)
    assert isinstance(decoded, Skipped)
    assert (decoded.reason, decoded.type) == ("unknown_type", "chat.future.thing")
    assert EVENTS_SKIPPED.labels("unknown_type", "chat.future.thing")._value.get() == before + 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: setattr(r, "value", b"{not json"),
        lambda r: setattr(r, "value", b"[1, 2]"),
        lambda r: setattr(r, "headers", [h for h in r.headers if h[0] != "ce_id"]),
        lambda r: setattr(
            r, "headers", [(k, b"0.3" if k == "ce_specversion" else v) for k, v in r.headers]
        ),
        lambda r: setattr(r, "value", r.value.replace(b'"kind":"text"', b'"kind":"video"')),
        lambda r: setattr(r, "value", r.value.replace(b'"body":"pd1:', b'"body":"pd1:AAAA')),
        lambda r: setattr(  # a time that overflows once taken to UTC
            r,
            "headers",
            [(k, b"9999-12-31T23:59:59-01:00" if k == "ce_time" else v) for k, v in r.headers],
        ),
    ],
)
def test_damaged_records_are_reported_as_poison_not_raised(damage: Any) -> None:
    record = written(sample_events()[10])
    damage(record)
    decoded = read(record)
    assert isinstance(decoded, Skipped)
    assert decoded.reason == "poison"
    assert decoded.error


def test_a_sealed_value_cannot_be_replayed_into_another_event() -> None:
    """The event id is authenticated with the ciphertext."""
    original = written(sample_events()[10])
    other = written(sample_events()[10])
    assert original.value is not None
    assert other.value is not None
    body = msgspec.json.decode(original.value)["body"]
    forged = msgspec.json.decode(other.value)
    forged["body"] = body
    other.value = msgspec.json.encode(forged)
    decoded = read(other)
    assert isinstance(decoded, Skipped)
    assert "authenticate" in decoded.error


def test_an_event_breaking_its_schema_is_refused_before_it_is_written() -> None:
    """msgspec does not check limits on construction; the encoder does, so no poison is written."""
    event = MessageSent(
        conversation_id=ROOM,
        message_id=uuid.uuid4(),
        sender_id=ALICE,
        client_msg_id="has space",
        body="hi",
    )
    with pytest.raises(InvalidEvent, match="client_msg_id"):
        encode_event(event, envelope(event), KEYS, LAYOUT)


_BAD_VALUES: tuple[object, ...] = (
    "",
    "has space",
    "x" * 5000,
    "nobody",
    -1,
    0,
    10**12,
    None,
    {"k" * 80: 1},
    {f"k{n}": n for n in range(40)},
    (),
    tuple(InitialMember(uuid.uuid4()) for _ in range(1001)),
    (InitialMember(uuid.uuid4(), "king"),),  # type: ignore[arg-type] - a role out of range
    "not-a-uuid",
)


def test_the_writers_check_refuses_exactly_what_a_readers_decoder_refuses() -> None:
    """Every field of every event type, set to values in and out of its limits: the encoder
    refuses the event if and only if the typed decoder of a reader would refuse its JSON
    (the encoder checks most types without a JSON round trip, nested Structs through one);
    a personal field is refused unless it is text or absent."""
    checked = 0
    for event in sample_events():
        cls = type(event)
        for field in msgspec.structs.fields(cls):
            for bad in _BAD_VALUES:
                changed = msgspec.structs.replace(event, **{field.name: bad})
                try:
                    msgspec.json.decode(msgspec.json.encode(changed), type=cls)
                    refused_by_reader = False
                except msgspec.ValidationError:
                    refused_by_reader = True
                try:
                    encode_event(changed, envelope(changed), KEYS, LAYOUT)
                    refused_by_writer = False
                except InvalidEvent:
                    refused_by_writer = True
                except (AttributeError, TypeError, ValueError):
                    continue  # not even an event of this shape (an id that is no UUID)
                # A personal field is written only as plaintext (or left out): anything else,
                # the erased marker included, is refused whatever a reader would make of it.
                not_text = field.name in cls.personal_fields and not isinstance(bad, str | None)
                expected = refused_by_reader or not_text
                assert refused_by_writer == expected, (cls.__name__, field.name, bad)
                checked += refused_by_reader
    assert checked > 100, "most of the bad values were refused by both"


def test_an_erased_value_cannot_be_written_back_into_the_log() -> None:
    """Only plaintext is sealed; an event carrying the erased marker is refused."""
    event = MessageSent(
        conversation_id=ROOM,
        message_id=uuid.uuid4(),
        sender_id=ALICE,
        client_msg_id="c-2",
        body=ERASED,
    )
    with pytest.raises(InvalidEvent, match="erased"):
        encode_event(event, envelope(event), KEYS, LAYOUT)


def test_streams_are_placed_where_kafkas_default_partitioner_puts_their_key() -> None:
    """The cached placement equals the Java-compatible murmur2 placement, for any count."""
    from aiokafka.partitioner import DefaultPartitioner

    for partitions in (1, 3, 8, 12):
        every = list(range(partitions))
        for _ in range(300):
            stream = uuid.uuid4()
            key, partition = stream_placement(stream, partitions)
            assert key == str(stream).encode()
            assert partition == DefaultPartitioner()(key, every, every)


def test_a_frame_is_pinned_byte_for_byte_and_matches_the_structured_object() -> None:
    """The fan-out frame's exact bytes (clients, the recent-history cache and resumes compare
    them), built by msgspec from UUIDs and the event itself; ``structured`` is the same object
    in plain values, and an erased personal value is marked."""
    event = MessageSent(
        conversation_id=ROOM, message_id=ROOM, sender_id=ALICE, client_msg_id="c1", body=ERASED
    )
    sent = envelope(
        event,
        id=uuid.UUID("0190a1b2-0000-7000-8000-0000000000aa"),
        time=dt.datetime(2026, 11, 26, 1, 2, 3, 456000, tzinfo=dt.UTC),
    )
    recorded = RecordedEvent(sent, event, Position(3, "conversation", 2, 41))
    room, alice = str(ROOM), str(ALICE)
    document = {
        "specversion": "1.0",
        "id": "0190a1b2-0000-7000-8000-0000000000aa",
        "source": "urn:test",
        "type": "chat.message.sent",
        "subject": room,
        "time": "2026-11-26T01:02:03.456Z",
        "datacontenttype": "application/json",
        "schemaversion": 1,
        "actor": alice,
        "correlationid": "req-1",
        "data": {
            "type": "chat.message.sent",
            "conversation_id": room,
            "message_id": room,
            "sender_id": alice,
            "client_msg_id": "c1",
            "kind": "text",
            "body": {"kind": "erased"},
            "reply_to": None,
            "media_id": None,
        },
    }
    assert structured(recorded) == document
    expected = json.dumps(
        {"type": "event", "conversation_id": room, "position": "3.c.2.41", "event": document},
        separators=(",", ":"),
    ).encode()
    assert frame(recorded) == expected


def test_event_ids_and_their_texts_are_the_standard_librarys() -> None:
    """Ids are made and formatted in C; they are plain UUIDv7s, time-ordered, and their text
    (a header, a subject) is exactly ``str()`` of them."""
    ids = [new_event_id() for _ in range(2000)]
    assert all(type(i) is uuid.UUID and i.version == 7 for i in ids)
    assert ids == sorted(ids), "v7 ids of one process sort by creation"
    assert all(uuid_text(i) == str(i) for i in ids[:200] + [uuid.uuid4() for _ in range(200)])
    event = sample_events()[0]
    env = envelope(event)
    headers = dict(encode_event(event, env, KEYS, LAYOUT).headers)
    assert headers["ce_id"] == str(env.id).encode()


def _with_body(plaintext: str) -> Record:
    """A MessageSent record whose body is ``plaintext`` sealed, whatever its limits say (as a
    foreign or older writer might have written it)."""
    event = sample_events()[10]
    assert isinstance(event, MessageSent)
    record = written(event)
    assert record.value is not None
    payload = msgspec.json.decode(record.value)
    env = read(record)
    assert isinstance(env, RecordedEvent)
    key = KEYS[ALICE]
    assert key is not None
    payload["body"] = seal(key, ALICE, env.envelope.id, plaintext)
    record.value = msgspec.json.encode(payload)
    return record


def test_a_body_whose_sealed_form_outgrows_its_limit_still_decodes() -> None:
    """Sealed events are read straight into their type when the sealed strings fit the field's
    limits, and through the JSON object when they do not (a long body grows by a third)."""
    for length in (1, 200, MESSAGE_BODY_MAX - 10, MESSAGE_BODY_MAX):
        decoded = read(_with_body("é" * length))
        assert isinstance(decoded, RecordedEvent), length
        assert isinstance(decoded.event, MessageSent)
        assert decoded.event.body == "é" * length


@pytest.mark.parametrize(
    ("sealed", "error"),
    [
        ("plain words", "not sealed"),
        ("pd1:!!!!", "not valid base64"),
        ("pd1:AAAA", "truncated"),
        # Past the field's limits: read through the JSON object.
        ("x" * (MESSAGE_BODY_MAX + 1), "not sealed"),
        ("pd1:" + "!" * MESSAGE_BODY_MAX, "not valid base64"),
    ],
    ids=["plain", "base64", "truncated", "long-plain", "long-base64"],
)
def test_a_malformed_sealed_value_is_poison_on_either_path(sealed: str, error: str) -> None:
    """A personal value that is not a sealed one is poison, whether the record is read straight
    into its type or (a value past the field's limits) through the JSON object."""
    record = _with_body("x")
    payload = msgspec.json.decode(record.value)
    payload["body"] = sealed
    record.value = msgspec.json.encode(payload)
    decoded = read(record)
    assert isinstance(decoded, Skipped)
    assert (decoded.reason, decoded.type) == ("poison", "chat.message.sent")
    assert error in decoded.error


def test_a_plaintext_out_of_its_limits_is_poison_on_either_path() -> None:
    """Unsealed values are checked against their type: an empty body (whose sealed form fits the
    limits) and an overlong one (whose sealed form does not) are both refused as poison."""
    for plaintext in ("", "x" * (MESSAGE_BODY_MAX + 1)):
        decoded = read(_with_body(plaintext))
        assert isinstance(decoded, Skipped), len(plaintext)
        assert decoded.reason == "poison"
        assert "body" in decoded.error


def test_a_records_size_counts_its_key_value_and_every_header() -> None:
    """The producer refuses a record over Kafka's request limit by this count alone."""
    for event in sample_events():
        for extra in ({}, {"causationid": "c" * 300, "actor": None, "correlationid": None}):
            out = encode_event(event, envelope(event, **extra), KEYS, LAYOUT)
            headers = sum(len(name) + len(value) for name, value in out.headers)
            assert out.size == len(out.key) + len(out.value) + headers


STRANGER = uuid.UUID(int=7)


def _headers(record: Record, change: dict[str, bytes | None]) -> Record:
    """``record`` with headers replaced (``None``: removed) or added."""
    headers = [(k, change.get(k, v)) for k, v in record.headers]
    headers += [(k, v) for k, v in change.items() if k not in dict(record.headers)]
    return Record(
        record.topic, record.partition, record.offset, record.value, [h for h in headers if h[1]]
    )


def _sent_variants() -> list[Record]:
    """A ``MessageSent`` in every shape a reader may meet: as writers write it (from a subject
    with a key, an erased one, one never keyed), damaged, foreign or older headers."""
    sent = sample_events()[10]
    assert isinstance(sent, MessageSent)
    plain = written(sent)
    payload = msgspec.json.decode(plain.value or b"")
    forged = written(sent)
    forged.value = msgspec.json.encode(
        {**msgspec.json.decode(forged.value or b""), **{"body": payload["body"]}}
    )
    event_id = dict(plain.headers)["ce_id"].decode()
    variants = [
        plain,
        # Sealed under a key since erased (BOB's), and under one never made (a stranger's).
        written(msgspec.structs.replace(sent, sender_id=BOB), keys={BOB: AESGCM(bytes(32))}),
        written(
            msgspec.structs.replace(sent, sender_id=STRANGER), keys={STRANGER: AESGCM(bytes(32))}
        ),
        written(
            msgspec.structs.replace(sent, body="x" * 200, kind="media", media_id=BOB, reply_to=ROOM)
        ),
        forged,  # another event's sealed body: does not authenticate
        _with_body("é" * MESSAGE_BODY_MAX),  # read through the JSON object
        *(_with_body(text) for text in ("", "a\x00b", "x" * (MESSAGE_BODY_MAX + 1))),
        _headers(plain, {"ce_schemaversion": None}),
        _headers(plain, {"ce_schemaversion": b"2"}),
        _headers(plain, {"content-type": None}),
        _headers(plain, {"content-type": b"text/plain"}),
        _headers(plain, {"ce_id": b"{" + event_id.encode() + b"}"}),
        _headers(plain, {"ce_id": b"not an id"}),
        _headers(plain, {"ce_time": b"yesterday"}),
        _headers(plain, {"ce_time": b"9999-12-31T23:59:59-01:00"}),  # past 9999 in UTC
        _headers(plain, {"ce_source": None}),
        _headers(plain, {"ce_subject": None}),
        _headers(plain, {"ce_specversion": b"0.3"}),
        _headers(plain, {"ce_type": b"chat.message.sent.v9"}),
    ]
    for body in ("plain words", "pd1:!!!!", "pd1:AAAA", "x" * (MESSAGE_BODY_MAX + 1), None):
        variants.append(
            Record(plain.topic, 1, 0, msgspec.json.encode({**payload, "body": body}), plain.headers)
        )
    for damage in ("{not json", "[1, 2]"):
        variants.append(Record(plain.topic, 1, 0, damage.encode(), plain.headers))
    kinds = plain.value.replace(b'"kind":"text"', b'"kind":"video"') if plain.value else None
    variants.append(Record(plain.topic, 1, 0, kinds, plain.headers))
    return variants


async def test_a_builds_compact_decoding_yields_exactly_what_decoding_does() -> None:
    """:func:`decode_compact` reads a well-formed ``MessageSent`` without its envelope, and
    every other record (other types, and a ``MessageSent`` in any other shape) as
    :func:`decode_records` does: both ways give the same events, poison and skips, and count
    the same skips."""
    keys: dict[uuid.UUID, AESGCM | None] = {**KEYS, BOB: None}

    async def fetch(subjects: Any) -> dict[uuid.UUID, AESGCM | None]:
        return {s: keys[s] for s in subjects if s in keys}

    records = [written(e) for e in sample_events()] + _sent_variants()
    for offset, record in enumerate(records):
        record.offset = offset

    async def counted(decode: Any) -> tuple[list[Any], Series]:
        before = series(EVENTS_SKIPPED)
        decoded = await decode(records, LAYOUT, 1, fetch)
        return decoded, added(EVENTS_SKIPPED, before)

    expected, expected_skips = await counted(decode_records)
    compact, compact_skips = await counted(decode_compact)
    assert compact_skips == expected_skips
    assert [c.recorded() if isinstance(c, CompactSent) else c for c in compact] == expected
    read_compactly = [c.position.offset for c in compact if isinstance(c, CompactSent)]
    # The sample's message, and of the variants: as written, under an erased key (no body), a
    # media message, and an id in braces (which the envelope's reading accepts too).
    assert read_compactly == [10, 18, 19, 21, 31], read_compactly
    bodies = {c.position.offset: c.body for c in compact if isinstance(c, CompactSent)}
    assert bodies[18] == sample_events()[10].body
    assert bodies[19] is None
    assert sum(isinstance(d, Skipped) and d.reason == "poison" for d in expected) >= 18
