"""The route table, and the OpenAPI 3.1 document generated from it and the msgspec Structs.

Every route is declared once, as an :class:`Operation`: the app's router and the served
``/v1/openapi.json`` both come from this table, and every schema in the document is generated
from the Structs in :mod:`schemas.api` (nothing is written by hand), so the document cannot
drift from what the handlers decode and encode.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web

from ingest.problems import CATALOG, PREFIX
from schemas.api import Problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    handler: Handler
    summary: str
    status: int = 200
    body: Any = None
    answer: Any = None
    public: bool = False
    """No credentials needed (registration, login, health)."""
    query: tuple[tuple[str, str, str], ...] = ()
    """(name, JSON type, description) of query parameters."""
    problems: tuple[int, ...] = ()
    """Problem statuses beyond the ones every operation can answer."""
    content_type: str = "application/json"


_PARAM = re.compile(r"\{([^}:]+)\}")
_ALWAYS = (400, 413, 415, 422, 429, 500, 503)


def _path_parameters(path: str) -> list[dict[str, Any]]:
    params = []
    for name in _PARAM.findall(path):
        schema: dict[str, Any] = {"type": "string"}
        if name.endswith("_id") or name in ("id",):
            schema["format"] = "uuid"
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


def build_document(operations: Sequence[Operation], *, title: str, version: str) -> dict[str, Any]:
    types = [Problem]
    for op in operations:
        types.extend(t for t in (op.body, op.answer) if t is not None)
    refs, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(types, refs, strict=True))
    problem_ref = ref_of[Problem]
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {}
        if op.answer is not None:
            responses[str(op.status)] = {
                "description": "success",
                "content": {op.content_type: {"schema": ref_of[op.answer]}},
            }
        else:
            responses[str(op.status)] = {"description": "success"}
        statuses = set(_ALWAYS) | set(op.problems) | ({401, 403} if not op.public else set())
        if _PARAM.search(op.path):
            statuses.add(404)
        for status in sorted(statuses):
            responses[str(status)] = {
                "description": ", ".join(
                    PREFIX + slug for slug, (code, _) in CATALOG.items() if code == status
                )
                or "error",
                "content": {"application/problem+json": {"schema": problem_ref}},
            }
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', op.path.lower())}",
            "responses": responses,
        }
        params = _path_parameters(op.path) + [
            {"name": n, "in": "query", "required": False, "schema": {"type": t}, "description": d}
            for n, t, d in op.query
        ]
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[op.body]}},
            }
        if op.public:
            entry["security"] = []
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def add_routes(app: web.Application, operations: Sequence[Operation]) -> None:
    app.router.add_routes([web.route(op.method, op.path, op.handler) for op in operations])
