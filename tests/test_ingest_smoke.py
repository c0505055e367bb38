"""First smoke checks of the ingest app against the real stack."""

from __future__ import annotations

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
