"""First smoke checks of the ingest app against the real stack."""

from __future__ import annotations

import os

import ingest.http
from eventstore import RecordedEvent
from tests.system_fixtures import System


async def test_register_login_create_send_read(system: System) -> None:
    api = system.api
    alice = await api.user()
    reply = await api.call("POST", "/v1/conversations", token=alice.access, json={"name": "g"})
    assert reply.status == 201, reply.body
    cid = reply.body["conversation_id"]
    reply = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=alice.access,
        json={"client_msg_id": "m1", "content": "hello"},
    )
    assert reply.status == 202, reply.body
    position = reply.body["position"]
    reply = await api.call(
        "GET", f"/v1/conversations/{cid}/messages?min_position={position}", token=alice.access
    )
    assert reply.status == 200, reply.body
    assert [m["content"] for m in reply.body["items"]] == ["hello"]


async def test_request_id_is_the_events_correlation_id_and_metrics_count(system: System) -> None:
    api = system.api
    alice = await api.user()
    reply = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        json={"name": "traced"},
        headers={"X-Request-Id": "trace-me-42"},
    )
    assert reply.status == 201
    assert reply.headers["X-Request-Id"] == "trace-me-42"
    async with system.store.reader(("conversation",)) as reader:
        found = [
            item
            async for batch in reader.batches_until_end()
            for item in batch.items
            if isinstance(item, RecordedEvent)
            and str(item.event.stream_id) == reply.body["conversation_id"]
        ]
    (event,) = found
    assert event.envelope.correlationid == "trace-me-42"
    assert event.envelope.actor == str(alice.user_id)
    # A request id that is not short and plain is replaced, never echoed.
    odd = await api.call("GET", "/healthz", headers={"X-Request-Id": "x" * 200})
    assert odd.headers["X-Request-Id"] != "x" * 200

    metrics = await api.call("GET", "/metrics")
    text = metrics.body.decode()
    assert (
        'backbone_http_requests_total{method="POST",route="/v1/conversations",status="201"}' in text
    )
    assert "backbone_produce_seconds_bucket" in text
    assert "backbone_logins_total" in text
    ready = await api.call("GET", "/readyz")
    assert ready.status == 200
    assert ready.body["checks"] == {"postgres": "ok", "redis": "ok", "kafka": "ok"}


async def test_fresh_request_ids_are_distinct(system: System) -> None:
    api = system.api
    ids = [(await api.call("GET", "/healthz")).headers["X-Request-Id"] for _ in range(3)]
    assert len(set(ids)) == 3
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)
    assert {i[:16] for i in ids} == {ingest.http._PROCESS_ID}


def test_a_forked_process_draws_its_own_request_id_prefix() -> None:
    prefix = ingest.http._PROCESS_ID
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports its prefix and leaves at once
        os.write(writer, ingest.http._PROCESS_ID.encode())
        os._exit(0)
    os.close(writer)
    _, status = os.waitpid(child, 0)
    theirs = os.read(reader, 64).decode()
    os.close(reader)
    assert status == 0
    assert len(theirs) == 16
    assert theirs != prefix
