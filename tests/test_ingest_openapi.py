"""The served OpenAPI document, and Schemathesis fuzzing the real app against it.

Schemathesis (synchronous, ``requests``) runs in a worker thread while the app serves on the
test's event loop. Each operation gets a bounded number of generated cases, with a real user's
token so that calls get past authentication; every answer must be no 5xx and must match the
document (status codes, content types, bodies).
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingest.app import OPERATIONS
from tests.system_fixtures import System

# Operations that end the fuzzing user's session would turn every later case into a 401.
SESSION_ENDING = {"POST /v1/auth/logout", "POST /v1/users/me/password", "DELETE /v1/users/me"}
SLOW = {"POST /v1/auth/register", "POST /v1/auth/login"}  # bcrypt at cost 12 per case
CASES, SLOW_CASES = 20, 6


async def test_the_document_lists_every_route_with_generated_schemas(system: System) -> None:
    reply = await system.api.call("GET", "/v1/openapi.json")
    assert reply.status == 200
    document = reply.body
    assert document["openapi"].startswith("3.1")
    served = {(m.upper(), path) for path, ops in document["paths"].items() for m in ops}
    assert served == {(op.method, op.path) for op in OPERATIONS}
    schemas = document["components"]["schemas"]
    send = schemas["SendMessageBody"]
    assert send["properties"]["content"]["maxLength"] == 4000
    assert send["additionalProperties"] is False
    assert set(send["required"]) == {"client_msg_id", "content"}
    assert "type" in send["properties"]  # the wire name, not the Python attribute
    problem = document["paths"]["/v1/conversations"]["post"]["responses"]["422"]
    assert "application/problem+json" in problem["content"]
    for path in (
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/{conversation_id}/messages:batch",
    ):
        conflict = document["paths"][path]["post"]["responses"]["409"]
        assert "urn:backbone:problem:client-msg-id-reused" in conflict["description"]


def _fuzz(base_url: str, token: str) -> list[str]:
    schema = schemathesis.openapi.from_url(base_url + "/v1/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures: list[str] = []
    ran: set[str] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if label in SESSION_ENDING:
            continue

        @hypothesis.settings(
            max_examples=SLOW_CASES if label in SLOW else CASES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(base_url=base_url, headers=headers, checks=checks)

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
            failures.append(f"{label}: " + "".join(traceback.format_exception(exc))[-3000:])
        ran.add(label)
    # Schemathesis leaves out the path the document itself is served from.
    expected = {f"{op.method} {op.path}" for op in OPERATIONS} - SESSION_ENDING
    expected.discard("GET /v1/openapi.json")
    assert ran == expected
    return failures


# Hypothesis watches the global `random` state while it draws a case, to catch strategies that
# use it; here the app under test runs concurrently on the main thread and its libraries draw
# from `random` (backoff jitter), which Hypothesis wrongly blames on Schemathesis's strategies.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_schemathesis_finds_no_server_errors_or_schema_violations(system: System) -> None:
    user = await system.api.user()
    base_url = str(system.api.client.make_url("")).rstrip("/")
    failures = await asyncio.to_thread(_fuzz, base_url, user.access)
    assert failures == [], "\n\n".join(failures)
