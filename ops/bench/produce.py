"""``backbone bench produce``: acknowledged events per second and ack latency at acks=all.

Four subjects, one run, the same stack, each against fresh topics of the same layout:

1. the event store's producer (``EventProducer.append``): 1 KB ``MessageSent`` events,
   validated, bodies sealed with AES-GCM, CloudEvents headers, bounded, keyed by conversation
   across many conversations;
2. raw aiokafka, same producer settings, producing the same events as a plain CloudEvents
   producer would (new event, JSON, fresh headers per record, same record size): the baseline
   the event store's overhead is judged against;
3. raw aiokafka re-sending one pre-encoded record: the Python client's ceiling with no
   per-event work at all;
4. Kafka's own ``ProducerPerformance`` tool (Java client, idempotent, acks=all), 1 KB records.

Subjects 1-3 run a closed loop of ``--concurrency`` workers, each awaiting its ack before the
next send, as concurrent HTTP requests would. The Java tool pipelines without bound (its own
design), so it shows the broker's ceiling on this machine rather than a like-for-like latency.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore import EventStore, Settings, TopicLayout, provision_topics
from eventstore.codec import encode_event
from eventstore.producer import default_producer_factory
from eventstore.runtime import run_command
from ops.bench.report import Figures, figures, table, write_json
from ops.environment import stack_settings
from ops.stack import default_stack_dir, stack_up
from ops.stack.jvm import java_path
from ops.stack.maven import KAFKA_TOOLS, fetch
from schemas import Envelope, MessageSent, format_time, new_event_id, utc_now

# A 730-character body seals to ~1 KB of base64 in a ~1.1 KB JSON record value.
BODY = ("lorem ipsum dolor sit amet " * 40)[:730]


def _event(conversation: uuid.UUID, sender: uuid.UUID, n: int) -> MessageSent:
    return MessageSent(
        conversation_id=conversation,
        message_id=uuid.uuid4(),
        sender_id=sender,
        client_msg_id=f"b-{n}",
        body=BODY,
    )


async def _closed_loop(
    total: int, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> tuple[list[float], float]:
    """Run ``one(i)`` ``total`` times with ``concurrency`` workers; latencies and wall time."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def bench_eventstore(
    settings: Settings, total: int, concurrency: int, conversations: list[uuid.UUID]
) -> Figures:
    senders = [uuid.uuid4() for _ in range(64)]
    async with await EventStore.open(settings) as store:
        producer = store.producer
        # Warm-up: metadata, connections and the senders' data keys.
        for i, sender in enumerate(senders):
            await producer.append([_event(conversations[i % len(conversations)], sender, i)])

        async def one(i: int) -> None:
            event = _event(conversations[i % len(conversations)], senders[i % len(senders)], i)
            await producer.append([event], actor=str(event.sender_id))

        latencies, seconds = await _closed_loop(total, concurrency, one)
    return figures("eventstore EventProducer.append", latencies, seconds)


async def bench_raw(
    settings: Settings, total: int, concurrency: int, conversations: list[uuid.UUID]
) -> Figures:
    """Raw aiokafka re-sending one pre-encoded record: the client's ceiling, no per-event work."""
    layout = TopicLayout.from_settings(settings)
    sample = _event(conversations[0], uuid.uuid4(), 0)
    envelope = Envelope(
        id=new_event_id(),
        source="urn:bench",
        type=sample.type_name(),
        subject=str(sample.conversation_id),
        time=utc_now(),
    )
    keys = {sample.sender_id: AESGCM(AESGCM.generate_key(256))}
    record = encode_event(sample, envelope, keys, layout)
    keys_bytes = [str(c).encode() for c in conversations]

    async def one(producer: AIOKafkaProducer, i: int) -> None:
        future = await producer.send(
            record.topic, record.value, key=keys_bytes[i % len(keys_bytes)], headers=record.headers
        )
        await future

    return await _raw_run(
        settings,
        total,
        concurrency,
        one,
        "raw aiokafka, one pre-encoded record",
        f"{len(record.value)} B values",
    )


async def bench_raw_events(
    settings: Settings, total: int, concurrency: int, conversations: list[uuid.UUID]
) -> Figures:
    """Raw aiokafka producing the same events as a plain CloudEvents producer would.

    Per event: a new ``MessageSent``, JSON-encoded, with fresh CloudEvents headers (id, time),
    keyed by conversation; a body as long as the event store's sealed one, so records are the
    same size. No validation, no encryption, no send bound: what the event store adds.
    """
    topic = TopicLayout.from_settings(settings).topic("conversation")
    sealed_length = len("pd1:") + 4 * -(-(16 + 12 + len(BODY) + 16) // 3)
    body = (BODY * 3)[:sealed_length]
    senders = [uuid.uuid4() for _ in range(64)]
    encoder = msgspec.json.Encoder()

    async def one(producer: AIOKafkaProducer, i: int) -> None:
        room = conversations[i % len(conversations)]
        event = MessageSent(
            conversation_id=room,
            message_id=uuid.uuid4(),
            sender_id=senders[i % len(senders)],
            client_msg_id=f"b-{i}",
            body=body,
        )
        key = str(room).encode()
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", str(new_event_id()).encode()),
            ("ce_source", b"urn:bench"),
            ("ce_type", b"chat.message.sent"),
            ("ce_subject", key),
            ("ce_time", format_time(utc_now()).encode()),
            ("content-type", b"application/json"),
        ]
        future = await producer.send(topic, encoder.encode(event), key=key, headers=headers)
        await future

    return await _raw_run(
        settings,
        total,
        concurrency,
        one,
        "raw aiokafka, per-event JSON + headers",
        "no crypto, validation or bound",
    )


async def _raw_run(
    settings: Settings,
    total: int,
    concurrency: int,
    one: Callable[[AIOKafkaProducer, int], Awaitable[None]],
    name: str,
    note: str,
) -> Figures:
    producer: AIOKafkaProducer = default_producer_factory(settings)()
    await producer.start()
    try:
        for i in range(64):  # warm-up: metadata and connections
            await one(producer, i)

        async def step(i: int) -> None:
            await one(producer, i)

        latencies, seconds = await _closed_loop(total, concurrency, step)
    finally:
        await producer.stop()
    return figures(name, latencies, seconds, note=note)


_JAVA_SUMMARY = re.compile(
    r"(\d+) records sent, ([\d.]+) records/sec .*?([\d.]+) ms avg latency, ([\d.]+) ms max "
    r"latency, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th"
)


def bench_java(settings: Settings, topic: str, total: int, size: int) -> Figures:
    lib = fetch(KAFKA_TOOLS)
    argv = [
        java_path("bench"),
        "-Xmx512m",
        "-cp",
        f"{lib}/*",
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        str(total),
        "--record-size",
        str(size),
        "--throughput",
        "-1",
        "--producer-props",
        f"bootstrap.servers={settings.kafka_bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        "linger.ms=1",
        "batch.size=262144",
    ]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - started
    match = _JAVA_SUMMARY.search(out.stdout.strip().splitlines()[-1] if out.stdout else "")
    if out.returncode != 0 or match is None:
        raise RuntimeError(
            f"ProducerPerformance failed: {out.stderr[-2000:] or out.stdout[-2000:]}"
        )
    sent, rate, _avg, max_ms, p50, _p95, p99 = match.groups()
    return Figures(
        name="Kafka ProducerPerformance (Java)",
        count=int(sent),
        seconds=round(seconds, 3),
        per_second=float(rate),
        p50_ms=float(p50),
        p99_ms=float(p99),
        max_ms=float(max_ms),
        note="open loop, unbounded in-flight",
    )


async def _fresh_topics(settings: Settings, name: str) -> Settings:
    fresh = msgspec.structs.replace(settings, topic_prefix=f"bench-{name}-{uuid.uuid4().hex[:8]}")
    await provision_topics(fresh.kafka_bootstrap, TopicLayout.from_settings(fresh))
    return fresh


def _median(rounds: list[Figures]) -> Figures:
    ordered = sorted(rounds, key=lambda f: f.per_second)
    middle = ordered[len(ordered) // 2]
    return msgspec.structs.replace(middle, note=f"{middle.note} median of {len(rounds)}".strip())


def run(args: argparse.Namespace) -> int:
    info = stack_up(default_stack_dir())
    base = stack_settings(info)
    conversations = [uuid.uuid4() for _ in range(args.conversations)]

    async def python_side() -> tuple[list[Figures], Settings]:
        # The subjects take turns, round after round, each on fresh topics: this machine's
        # speed drifts by tens of percent over a minute, and interleaving spreads the drift
        # over all three. Each subject's median round is reported.
        subjects = (("es", bench_eventstore), ("rawev", bench_raw_events), ("raw", bench_raw))
        rounds: dict[str, list[Figures]] = {name: [] for name, _ in subjects}
        for _ in range(args.rounds):
            for name, bench in subjects:
                settings = await _fresh_topics(base, name)
                rounds[name].append(
                    await bench(settings, args.events, args.concurrency, conversations)
                )
        medians = [_median(rounds[name]) for name, _ in subjects]
        return medians, await _fresh_topics(base, "java")

    # The Python subjects run as the ingest tier runs its producer (uvloop, the serving
    # tier's collector thresholds), all of them alike.
    (es, raw_events, raw), java_settings = run_command(python_side(), bulk=False)
    java = bench_java(
        java_settings,
        TopicLayout.from_settings(java_settings).topic("conversation"),
        args.java_events,
        1024,
    )
    rows = [es, raw_events, raw, java]
    vs_events = es.per_second / raw_events.per_second if raw_events.per_second else 0.0
    vs_ceiling = es.per_second / raw.per_second if raw.per_second else 0.0
    print(table(rows))
    print(f"eventstore / raw aiokafka per-event: {vs_events:.1%} (goal >= 80%)")
    print(f"eventstore / raw aiokafka one pre-encoded record (client ceiling): {vs_ceiling:.1%}")
    write_json(
        Path(args.out),
        "produce",
        {
            "events": args.events,
            "rounds": args.rounds,
            "java_events": args.java_events,
            "concurrency": args.concurrency,
            "conversations": args.conversations,
            "acks": "all",
            "idempotent": True,
            "brokers": info.brokers,
        },
        rows,
        {
            "eventstore_vs_raw_events": round(vs_events, 4),
            "eventstore_vs_raw_ceiling": round(vs_ceiling, 4),
        },
    )
    print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "produce", help="event store producer vs raw aiokafka vs Java", description=__doc__
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per subject")
    parser.add_argument("--java-events", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--out", default="bench-results/produce.json")
    parser.set_defaults(func=run)
