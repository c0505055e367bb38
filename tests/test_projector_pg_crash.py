"""PostgreSQL killed outright under the live projector, on a server of the test's own.

The live projector commits its batches without waiting for the WAL flush
(``Projector(durable_commits=False)``): a crash of PostgreSQL may take back batches it had
committed, rows and offsets together. The drill checks that nothing else is ever lost or
applied twice: a worker cut off mid-batch exits and is started again once the server has
recovered; an idle one lives through the crash and seeks back at its next batch; either applies
again what the crash took back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from eventstore import EventStore, Settings
from ops.bench.cores import descendants
from ops.provision import migrate_all
from ops.stack.postgres import PART, Postgres, dsn
from ops.stack.process import cmdline, poll, wait_gone
from ops.stack.state import StateStore
from tests.store_fixtures import fresh_topics
from tests.test_projector_drills import (
    Worker,
    applied_total,
    assert_equals_clean_replay,
    produce,
    workload,
)
from tests.test_projector_support import log_end, wait_for

pytestmark = pytest.mark.fault


class OwnPostgres:
    """A PostgreSQL server of the test's own: the stack's code, another data directory and
    port, so that crashing it disturbs no other test."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.server = Postgres(data_dir, StateStore(data_dir))

    def _record(self) -> tuple[int, int | None]:
        record = self.server.store.load().parts[PART]
        return record.port, record.pid

    @property
    def dsn(self) -> str:
        return dsn(self._record()[0])

    async def start(self) -> None:
        """Start the server (creating the cluster the first time; crash recovery after one)."""
        await asyncio.to_thread(self.server.start)

    async def configure(self, **settings: str) -> None:
        """Set server settings that a reload applies, and wait until they are in effect."""
        conf = self.server.pgdata() / "postgresql.conf"
        with conf.open("a") as out:  # after the stack's `include`: these win
            out.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
        _, pid = self._record()
        assert pid is not None
        os.kill(pid, signal.SIGHUP)

        async def applied() -> bool:
            conn = await asyncpg.connect(self.dsn)
            try:
                for name, value in settings.items():
                    if await conn.fetchval(f"SHOW {name}") != value:
                        return False
                return True
            finally:
                await conn.close()

        await wait_for(applied, 30, f"the server applied {settings}")

    def processes(self) -> set[int]:
        """The server's processes: the postmaster and every process below it."""
        _, postmaster = self._record()
        assert postmaster is not None
        return descendants([postmaster])

    def freeze_wal_writer(self) -> None:
        """SIGSTOP the WAL writer: an asynchronous commit then stays in PostgreSQL's memory
        (nothing else writes it out here: autovacuum is off and no other session commits)."""
        found = [pid for pid in self.processes() if cmdline(pid).startswith("postgres: walwriter")]
        assert len(found) == 1, "the server runs one WAL writer"
        os.kill(found[0], signal.SIGSTOP)

    def crash(self) -> None:
        """Stop every process of the server, then SIGKILL them: no shutdown, no checkpoint, and
        the WAL still in its shared memory is gone (what the OS had been given survives). All
        are stopped first, so that none of them reacts to another's death (each child leads a
        process group of its own: they are signalled one by one)."""
        processes = list(self.processes())
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        assert not wait_gone(processes, 10.0), "every process of the server is gone"

    def remove(self) -> None:
        """Stop the server and delete its cluster (which may live outside the data dir)."""
        _, pid = self._record()
        if pid is not None and poll(pid).alive:  # a test failed with its WAL writer frozen,
            for process in self.processes():  # which a shutdown would leave behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGCONT)
        self.server.stop()
        home = self.server.home()
        if home.parent.name.startswith("backbone-stack-"):  # the /var/tmp fallback
            shutil.rmtree(home.parent, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[OwnPostgres]:
    server = OwnPostgres(tmp_path / "own-stack")
    await server.start()
    try:
        # Autovacuum's commits wait for the WAL flush and would flush the projector's with them.
        await server.configure(autovacuum="off")
        yield server
    finally:
        server.remove()


async def applied_on(server: OwnPostgres) -> int:
    """:func:`applied_total` on a new connection: the pools of the processes the server's
    crashes cut off are not trusted."""
    conn = await asyncpg.connect(server.dsn)
    try:
        return await applied_total(conn)
    finally:
        await conn.close()


async def flush_the_wal(server: OwnPostgres) -> None:
    """Commit a transaction that waits for the WAL flush, which flushes every commit before it.

    It must write WAL of its own: PostgreSQL commits a transaction that wrote none (one that
    only took a transaction id, say) without waiting for the flush. A table of the test's own
    takes a row; not a temporary table, whose removal when the session ends is a commit too,
    which can land later, among the commits the test means to lose."""
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute("SET synchronous_commit TO on")
        await conn.execute("CREATE TABLE IF NOT EXISTS wal_flushes (at timestamptz)")
        await conn.execute("INSERT INTO wal_flushes VALUES (now())")
    finally:
        await conn.close()


async def test_postgresql_crashes_take_back_whole_batches_which_the_worker_applies_again(
    base_settings: Settings, own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """Three crashes. The first is staged: the worker applies the log so far, a durable commit
    flushes it, the WAL writer is frozen, and the worker commits 2,000 more messages, which
    readers see; the crash takes those back, and only those (the model restarts between the two
    marks). The worker, idle meanwhile, lives through it: at its next batch the stored offsets
    are behind its own, it seeks back to them and applies the lost events again. The other two
    crashes land at random points of the two halves of the rest, each appended while the worker
    waits so that it is busy when the crash comes, and end it. In the end every message is
    applied once and the model equals a clean single pass."""
    server = own_postgres
    settings = msgspec.structs.replace(
        await fresh_topics(base_settings, user_partitions=2, conversation_partitions=4),
        postgres_dsn=server.dsn,
    )
    await migrate_all(settings.postgres_dsn)
    events, sent = workload(rooms=200, users=100, messages=30_000, seed=23)
    first, second = len(events) * 4 // 30, len(events) * 6 // 30
    rng = random.Random(29)
    worker = Worker(settings, tmp_path / "projector.log")

    async def applied(target: int) -> bool:
        return await applied_on(server) >= target

    async def reached(target: int) -> None:
        """Wait until the model holds ``target`` events, looking every 20 ms (not backing off
        as ``wait_for`` does: a crash is meant to land while the worker still applies)."""
        async with asyncio.timeout(60):
            while not await applied(target):
                await asyncio.sleep(0.02)

    try:
        await worker.start()
        # The store's key ring is on the server: it is closed before a crash, opened after.
        async with await EventStore.open(settings) as store:
            await produce(store, events[:first])  # every user's key is made here, durably
            flushed = await log_end(store)
            await wait_for(lambda: applied(flushed), 60, "the worker applied the first part")
            await flush_the_wal(server)
            server.freeze_wal_writer()
            await produce(store, events[first:second])
            visible = await log_end(store)
            await wait_for(lambda: applied(visible), 60, "the worker applied the second part")
        server.crash()
        await server.start()
        recovered = await applied_on(server)
        assert flushed <= recovered < visible, (
            f"the crash took back the commits after the flush, and only those: "
            f"{flushed} <= {recovered} < {visible}"
        )
        # The rest comes in two halves, a crash at a random point of each while the worker
        # applies it. Each half is appended while the worker waits (paused, or not started
        # again yet), so that it is thousands of events from the end when the crash comes.
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGSTOP)
        half = (len(events) + second) // 2
        for number, part in enumerate((events[second:half], events[half:])):
            async with await EventStore.open(settings) as store:
                start = await log_end(store)
                await produce(store, part)
                end = await log_end(store)
            assert end - start > 10_000
            if number == 0:
                worker.proc.send_signal(signal.SIGCONT)
                await reached(visible)  # at its next batch, the lost events applied again
                assert worker.proc.returncode is None, "the worker lived through the crash"
                assert b"reader.positions_moved" in worker.log.read_bytes()
            else:
                await worker.start()
            await reached(start + rng.randint(1000, 5000))
            await asyncio.sleep(rng.uniform(0, 0.05))  # land anywhere inside a batch
            server.crash()
            # Cut off mid-batch (or at its next one), the worker exits non-zero; its
            # supervisor, played here, starts it again once the server has recovered.
            async with asyncio.timeout(60):
                assert await worker.proc.wait() != 0
            await server.start()
        await worker.start()
        await wait_for(lambda: applied(end), 120, "the worker applied the whole log")
        assert await worker.stop() == 0
    finally:
        if worker.proc is not None and worker.proc.returncode is None:
            worker.proc.send_signal(signal.SIGCONT)
            await worker.kill()
    async with await EventStore.open(settings) as store:
        counted = await store.pool.fetchrow(
            "SELECT count(*) AS messages, count(DISTINCT message_id) AS distinct_ids"
            " FROM chat.messages"
        )
        assert counted is not None
        assert (counted["messages"], counted["distinct_ids"]) == (sent, sent)
        assert await store.pool.fetchval("SELECT sum(message_count) FROM chat.conversations") == (
            sent
        ), "every message counted once in its conversation"
        assert await store.pool.fetchval("SELECT count(*) FROM chat.dead_letters") == 0
        await assert_equals_clean_replay(settings, store)
