"""The read API's ``min_position``: read-your-writes, and positions the log does not hold."""

from __future__ import annotations

from tests.system_fixtures import System

PROBLEM = "urn:backbone:problem:"


async def test_a_position_the_log_does_not_hold_is_refused_at_once(system: System) -> None:
    """No such partition, or past the partition's end: 400 ``invalid-parameter`` without
    waiting (it had waited out ``read_wait_max`` and answered 503 ``read-model-lagging``). A
    position a command answered is read as before."""
    api = system.api
    alice = await api.user()
    made = await api.call("PATCH", "/v1/users/me", token=alice.access, json={"status": "here"})
    assert made.status == 202, made.body
    epoch, stream, partition, offset = made.body["position"].split(".")
    partitions = system.store.layout.partitions("user")
    for token in (
        f"{epoch}.{stream}.{partitions}.0",
        f"{epoch}.{stream}.{partition}.{int(offset) + 1_000_000}",
    ):
        refused = await api.call("GET", f"/v1/users/me?min_position={token}", token=alice.access)
        assert (refused.status, refused.body["type"]) == (400, PROBLEM + "invalid-parameter")
    read = await api.call(
        "GET", f"/v1/users/me?min_position={made.body['position']}", token=alice.access
    )
    assert read.status == 200
    assert read.body["status"] == "here"
