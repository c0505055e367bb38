"""A fanout node: owns every long-lived client and task, serves the port, shuts down cleanly.

Clients are opened in order in :meth:`FanoutNode.start` and closed in reverse in
:meth:`FanoutNode.stop`. The listening socket uses ``SO_REUSEPORT``, so several processes
share one port and the kernel spreads connections across them; a client whose node stops
(or dies) reconnects, lands on another, and resumes with its cursors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Coroutine
from typing import Any

import msgspec
import prometheus_client
import structlog
from redis.asyncio import BlockingConnectionPool, Redis

from eventstore import EventStore, Settings
from eventstore.runtime import started
from fanout.config import FanoutConfig
from fanout.connection import OPEN, Connection
from fanout.history import History
from fanout.hub import Hub
from fanout.membership import Snapshots
from fanout.metrics import CONNECTIONS, QUEUE_BYTES
from fanout.signals import Signals
from fanout.tail import Tail
from ingest.auth import AccessTokens, SessionStore, TokenKeys, load_jwt_keys
from projectors.read import ReadSide

log = structlog.get_logger(__name__)


class FanoutNode:
    def __init__(
        self, settings: Settings, config: FanoutConfig, keys: TokenKeys | None = None
    ) -> None:
        self.settings = settings
        self.config = config
        self._keys = keys or load_jwt_keys()
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._store: EventStore | None = None
        self._redis: Redis | None = None
        self._tail: Tail | None = None
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.hub: Hub | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        settings, config = self.settings, self.config
        namespace = settings.topic_prefix
        store = self._store = await EventStore.open(settings, with_producer=False, migrate=False)
        # A connection storm (every client of a dead node at once) waits for a pooled
        # connection instead of failing with "too many connections".
        redis = self._redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=64, timeout=10
            )
        )
        tokens = AccessTokens(
            self._keys,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            leeway=config.token_leeway,
        )
        read_side = ReadSide(store.pool, redis, namespace)
        tail = self._tail = Tail(store)
        await tail.start()
        hub = self.hub = Hub(
            config,
            store,
            tail,
            tokens=tokens,
            sessions=SessionStore(store.pool, redis, tokens, namespace=namespace),
            read_side=read_side,
            history=History(
                store,
                redis,
                read_side,
                cache_wait=config.resume_wait,
                log_timeout=config.resume_timeout,
            ),
            snapshots=Snapshots(store.pool, store.layout.topic("conversation")),
        )
        signals = hub.signals = Signals(
            redis,
            namespace,
            self.node_id,
            presence_ttl=config.presence_ttl,
            on_typing=hub.on_typing,
            on_presence=hub.on_presence,
            on_revocation=hub.on_revocation,
            on_epoch=hub.on_epoch,
            on_subscribed=hub.on_subscribed,
        )
        hub.http_routes = {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": _metrics}
        self._spawn(tail.run(hub.apply), "tail")
        self._spawn(signals.listen(), "signals.listen")
        self._spawn(signals.send(), "signals.send")
        self._spawn(signals.heartbeat(hub.audiences.users), "presence")
        self._spawn(self._sweep(hub), "sweep")
        self._spawn(_until_epoch_changes(hub), "epoch")
        async with asyncio.timeout(10):
            await signals.subscribed.wait()
        CONNECTIONS.labels("open").set_function(
            lambda: sum(1 for c in hub.connections if c.state == OPEN)
        )
        CONNECTIONS.labels("other").set_function(
            lambda: sum(1 for c in hub.connections if c.state != OPEN)
        )
        QUEUE_BYTES.set_function(lambda: sum(c.buffered() for c in hub.connections))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(hub),
            config.host,
            config.port,
            reuse_port=True,
            backlog=4096,
        )
        started()
        log.info("fanout.listening", url=f"ws://{config.host}:{self.port}/v1/ws", node=self.node_id)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def wait(self) -> None:
        """Return when a task the node cannot live without ends (it logs why), or when the
        log's epoch changed (the node must be restarted against the new log)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("fanout.task_failed", task=task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Stop accepting, ask every socket to go elsewhere, then close the clients."""
        if self._server is not None:
            self._server.close()
        hub = self.hub
        if hub is not None:
            hub.shutdown()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.shutdown_grace):
                    await hub.emptied.wait()
            for conn in list(hub.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=self.config.shutdown_grace)
        for task in stuck:
            log.warning("fanout.task_did_not_stop", task=task.get_name())
        self._tasks.clear()
        if self._tail is not None:
            await self._tail.stop()
        if self._redis is not None:
            await self._redis.aclose()
            await self._redis.connection_pool.disconnect()
        if self._store is not None:
            await self._store.close()
        log.info("fanout.stopped", node=self.node_id)

    async def _sweep(self, hub: Hub) -> None:
        while True:
            await asyncio.sleep(1.0)
            hub.sweep()

    async def _healthz(self, conn: Connection) -> None:
        conn.respond(200, b'{"status":"ok"}')

    async def _readyz(self, conn: Connection) -> None:
        """200 when the tail runs and PostgreSQL and Redis answer within a second each."""
        checks: dict[str, str] = {}
        tail_task = next((t for t in self._tasks if t.get_name() == "tail"), None)
        checks["tail"] = "ok" if tail_task is not None and not tail_task.done() else "stopped"
        assert self._store is not None
        assert self._redis is not None
        for name, probe in (
            ("postgres", self._store.pool.fetchval("SELECT 1")),
            ("redis", self._redis.ping()),
        ):
            try:
                async with asyncio.timeout(1.0):
                    await probe
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; reported
                checks[name] = f"unavailable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values()) and not (self.hub and self.hub.draining)
        body = msgspec.json.encode({"ready": ready, "checks": checks})
        conn.respond(200 if ready else 503, body)


async def _metrics(conn: Connection) -> None:
    conn.respond(200, prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST)


async def _until_epoch_changes(hub: Hub) -> None:
    await hub.epoch_changed.wait()
