"""First smoke checks of the ingest app against the real stack."""

from __future__ import annotations

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
