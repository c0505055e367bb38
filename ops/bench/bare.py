"""The framework's ceiling for ``bench ingest``: a bare aiohttp handler, nothing durable.

It does what every ingest request must do before any real work, and nothing else: verify the
access JWT (same keys, algorithm and checks as ingest) and decode and validate the JSON body
with the same msgspec Struct, then answer 202. Run as ``python -m ops.bench.bare PORT``.
"""

from __future__ import annotations

import asyncio
import sys

import msgspec
from aiohttp import web

from eventstore.runtime import run
from ingest.auth.errors import InvalidToken
from ingest.auth.tokens import AccessTokens, load_jwt_keys
from ingest.config import load_ingest_config
from schemas.api import SendMessageBody

_ACCEPTED = b'{"position":"0.c.0.0"}'


def create_bare_app() -> web.Application:
    config = load_ingest_config()
    # The full signature check on every request, as the reference measures it
    # (ingest itself remembers tokens it verified; see AccessTokens.verify).
    tokens = AccessTokens(
        load_jwt_keys(), issuer=config.jwt_issuer, audience=config.jwt_audience, memo=False
    )
    decoder = msgspec.json.Decoder(SendMessageBody)

    async def handle(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        try:
            tokens.verify(header.removeprefix("Bearer "))
            decoder.decode(await request.read())
        except (InvalidToken, msgspec.ValidationError, msgspec.DecodeError):
            return web.Response(status=400)
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/conversations/{conversation_id}/messages", handle)
    return app


async def _serve(port: int) -> None:
    runner = web.AppRunner(create_bare_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"bare handler on {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    run(_serve(int(sys.argv[1])))
