"""``backbone audit`` and ``backbone erase`` against the real stack."""

from __future__ import annotations

import json
import uuid

import pytest

from eventstore import RecordedEvent
from eventstore.audit import AuditFilter, audit_events
from ops.privacy import erase_async, run_audit_async
from tests.system_fixtures import System


async def _audit(system: System, **filters: object) -> list[RecordedEvent]:
    return [e async for e in audit_events(system.store, AuditFilter(**filters))]  # type: ignore[arg-type]


async def test_audit_filters_and_shows_erased_data_after_an_operator_erasure(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    room = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        json={"name": "audited", "members": [str(bob.user_id)]},
    )
    cid = uuid.UUID(room.body["conversation_id"])
    other = await api.call(
        "POST", "/v1/conversations", token=bob.access, json={"name": "elsewhere"}
    )
    assert other.status == 201
    for n in range(3):
        sent = await api.call(
            "POST",
            f"/v1/conversations/{cid}/messages",
            token=alice.access,
            json={"client_msg_id": f"a{n}", "content": f"alice says {n}"},
        )
        assert sent.status == 202

    in_room = await _audit(system, conversation=cid)
    assert [e.envelope.type for e in in_room] == ["chat.conversation.created"] + [
        "chat.message.sent"
    ] * 3
    by_alice = await _audit(system, user=alice.user_id)
    types = [e.envelope.type for e in by_alice]
    assert "chat.user.registered" in types
    assert types.count("chat.message.sent") == 3
    assert "chat.session.started" in types
    assert all(e.event.stream_id != uuid.UUID(other.body["conversation_id"]) for e in by_alice)
    only_sends = await _audit(system, user=alice.user_id, types=frozenset({"chat.message.sent"}))
    assert [e.event.body for e in only_sends] == [f"alice says {n}" for n in range(3)]  # type: ignore[attr-defined]
    last = only_sends[-1].envelope.time
    assert (
        len(
            await _audit(
                system, user=alice.user_id, types=frozenset({"chat.message.sent"}), since=last
            )
        )
        == 1
    )

    result = await erase_async(system.settings, alice.user_id)
    assert result["user_id"] == str(alice.user_id)
    assert (await api.call("GET", "/v1/conversations", token=alice.access)).status == 401

    capsys.readouterr()
    await run_audit_async(system.settings, AuditFilter(conversation=cid), as_json=True)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sends = [d for d in lines if d["type"] == "chat.message.sent"]
    assert len(sends) == 3
    assert all(d["data"]["body"] == {"kind": "erased"} for d in sends)
    assert all(d["position"].startswith(f"{system.store.epoch}.c.") for d in sends)
    assert "alice says" not in json.dumps(lines)
