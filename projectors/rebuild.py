"""Rebuilding the read model: project the whole log into a shadow schema, then swap it in.

``backbone replay`` builds a new version of the live schema (``chat``) from offset 0 into
``chat_next`` with a :class:`~projectors.projector.Projector` of its own, driven by a
group-less :class:`~eventstore.LogReader`. It is not a member of the live projector's group:
it stores its positions in the shadow's own ``offsets`` table, in the transaction of each
batch, so a rebuild that dies is resumed by running it again (it reads on from the shadow's
stored offsets). Meanwhile the live projector keeps serving and writing ``chat``.

The shadow is created for a build (:func:`~projectors.schema.create_schema` with ``build``):
primary keys only, the secondary indexes built in one sorted pass each once the build passes
are done, and the erasures the build recorded meanwhile applied then
(:func:`~projectors.schema.finish_build`), followed by one more pass for what was written
meanwhile. Nothing reads the shadow before the swap.

Once the shadow has caught up with the log end, the swap is one transaction:

1. ``LOCK chat.offsets IN ACCESS EXCLUSIVE MODE``: waits for the live batch in flight (which
   holds the rows it claimed) and holds every later batch at its claim;
2. a last catch-up of the shadow (the few records written since the previous pass), so the
   new model is at least as far as the live one was and reads never go back in time;
3. ``ALTER SCHEMA chat RENAME TO chat_old_<n>``, ``ALTER SCHEMA chat_next RENAME TO chat``;
4. ``pg_export_snapshot()``, imported by a second read-only transaction that later computes
   the checksum of exactly what was swapped in, whatever the live projector commits after;
5. commit; then the Redis caches are rebuilt from the new schema and the old schema dropped.

The live projector's next batch resolves ``chat.offsets`` to the new table (PostgreSQL
re-resolves names after the lock wait, and a schema rename invalidates every cached plan,
so asyncpg's prepared statements are re-planned against the new tables; their result types
are unchanged, so no :class:`asyncpg.InvalidCachedStatementError` either). Its
compare-and-set either matches the new offsets or raises
:class:`~eventstore.consumer.PositionsMoved`, and the reader seeks to the new model's
positions: nothing is lost or applied twice.

The build passes run in worker processes (``workers``, default: :func:`default_workers`, one
per CPU and one more): the partitions are dealt out by how many records each still has to
apply, and every worker reads its share with a :class:`~eventstore.LogReader` of its own and
applies it with a :class:`~projectors.projector.Projector` of its own into the same shadow.
Decoding is CPU work in Python, so one process cannot use a second core. The workers are forked
from a server process (multiprocessing's fork server) that imported their code once, started
while the rebuild prepares the shadow: started afresh, each had spent about 0.3 s of CPU on
imports before its first batch. Workers never claim
the same partition (offsets are rows per partition); what their batches write is disjoint too
(user streams write users, sessions and media; a conversation's rows live in its own
partition), except an erasure, which redacts rows of every table:
:func:`~projectors.apply.apply_items` serialises batches holding one against every other batch
of the schema, so they can neither deadlock nor undo each other's writes. The swap's own pass
is short and runs in this process.

A rebuild never touches the fan-out tier: fan-out reads Kafka from the live end, not the read
model, and a rebuild writes nothing to Kafka, so no event is pushed again. The recent-history
cache (fan-out resume) is left as the live projector keeps it; only the membership,
user-conversation and summary caches are rebuilt from PostgreSQL.

*Other sources, a point in time, another schema* (``source``, ``until``, ``into``; see
:mod:`projectors.sources`). With a ``source`` (the S3 archive: ``replay --from s3``) or an
``until`` bound, every pass reads that source (a long build pass in worker processes, as above, the
rest in this process) and stops each partition at the bound, resolved once here. ``into`` builds
into a schema of that name and leaves it there: no swap, no caches, nothing dropped; the result's
checksum is of that schema. A point-in-time model must not be swapped in (the live projector would
re-seek and carry it forward to the log end again), so ``backbone replay --until`` requires
``--into``: the model of the past stays in a schema of its own, e.g. for an audit, next to the live
one. A replay from S3 without ``--into`` swaps as above; the swap's last pass reads the archive
too, so the model swapped in is where the archive ended when the run listed it, and the live
projector moves it on from there to the log end.
Rerunning with the same options resumes an ``into`` schema from its stored offsets (rerun it
with the *same* bound: records already applied are never taken back).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from multiprocessing.connection import Connection as ProcessPipe
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Final

import msgspec
import structlog

from eventstore import Connection, EventStore, Pool, Settings
from eventstore.consumer import Partition
from eventstore.ends import LogEnds, end_offsets
from eventstore.epoch import read_epoch
from eventstore.runtime import run as run_loop
from eventstore.runtime import tune_gc
from projectors.checksum import snapshot_readers
from projectors.errors import ProjectorError
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import (
    READ_MODEL_VERSION,
    checked_schema_name,
    create_schema,
    finish_build,
    schema_exists,
)
from projectors.sources import (
    REPLAY_BATCH,
    REPLAY_BATCH_BYTES,
    Cut,
    KafkaSource,
    RecordSource,
    SourceSpec,
    Until,
    build_batches,
    open_source,
    read_ahead,
    replay_source,
    resolve_cut,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

# Replay workers fork from a server that imports this module: the Redis client (a fifth of a
# second of CPU to import) is loaded only where caches are rebuilt, as aiohttp only where a tier
# serves HTTP.

log = structlog.get_logger(__name__)

# One rebuild at a time per database (session-level advisory lock; value is "rebuild!").
_REBUILD_LOCK: Final = 0x72656275696C6421
_READ_MODEL_COMMENT: Final = "backbone read model v"
_EPOCH_COMMENT: Final = "built from the log of epoch "
"""The comment of a shadow's ``offsets`` table: the log epoch its offsets belong to."""
_VERSION_COMMENT: Final = f"{_READ_MODEL_COMMENT}{READ_MODEL_VERSION}"
# A build pass goes to worker processes from this many batches of records to apply, or from
# _PARALLEL_RECORDS records if that is fewer (each worker opens connections and a reader of its
# own, and reads a batch ahead).
_PARALLEL_BATCHES: Final = 10
_PARALLEL_RECORDS: Final = 200_000
# Build passes go on until one finds fewer records than a batch or than this, whichever is
# fewer: the swap's own pass, which the live projector waits for, stays short.
_SWAP_PASS_RECORDS: Final = 20_000


def default_workers() -> int:
    """Processes of a rebuild's build passes unless told: one per CPU, and one more.

    A worker waits for PostgreSQL while its batch is written; with one worker per CPU a core
    then idles, with one more it decodes the next worker's batch meanwhile. Alternating
    million-event replays on 2 CPUs: 3 workers beat 2 in 5 pairs of 5 (+11 % on average);
    4 and 6 did no better than 3.
    """
    return (os.cpu_count() or 1) + 1


_MAX_BUILD_PASSES: Final = 6
"""Catch-up passes before the swap at most (see :meth:`Rebuild._locked_run`)."""


class ReplayWorkerFailed(ProjectorError):
    """A replay worker process exited with an error (its log went to stderr); rerun resumes."""


class RebuildRunning(ProjectorError):
    """Another rebuild of the same database holds the rebuild lock; retry when it is done."""


class Progress(msgspec.Struct, frozen=True):
    """How far a rebuild is: records applied by this run, out of ``total`` to reach the end."""

    phase: str
    applied: int
    total: int
    seconds: float

    @property
    def rate(self) -> float:
        """Records per second so far."""
        return self.applied / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (``None`` before the first batch)."""
        rate = self.rate
        return max(self.total - self.applied, 0) / rate if rate > 0 else None


class RebuildResult(msgspec.Struct, frozen=True):
    """What a completed rebuild swapped in."""

    schema: str
    replaced: str | None
    """The name the previous live schema had between the swap and its drop (None: none)."""
    resumed: bool
    """Whether this run continued a shadow an interrupted run had left."""
    records: int
    """Records this run applied to the shadow."""
    seconds: float
    positions: dict[str, int]
    """Next offset per ``topic/partition`` of the model as swapped in."""
    checksum: str
    """:func:`~projectors.checksum.checksum` of the model as swapped in."""


class _Swapped(msgspec.Struct, frozen=True):
    replaced: str | None
    positions: dict[str, int]
    checksum: str


ProgressCallback = Callable[[Progress], None]


def shadow_schema(live: str) -> str:
    """The schema a rebuild of ``live`` is built in."""
    return checked_schema_name(f"{live}_next")


async def _schema_comment(conn: Connection | Pool, schema: str) -> str | None:
    comment: str | None = await conn.fetchval(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
        schema,
    )
    return comment


async def _old_schemas(conn: Connection | Pool, live: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1 ORDER BY nspname",
        f"{live}\\_old\\_%",
    )
    return [checked_schema_name(r[0]) for r in rows]


class ReplayShare(msgspec.Struct, frozen=True):
    """What one replay worker process applies: its partitions, up to their end as of its start."""

    settings: Settings
    schema: str
    partitions: list[tuple[str, int]]
    batch: int
    source: SourceSpec | None = None
    """``None``: the log, to its end as of the worker's start; else that source up to ``cut``."""
    cut: Cut | None = None


_SHARE = msgspec.msgpack.Decoder(ReplayShare)


def goes_parallel(remaining: Mapping[Partition, int], batch: int) -> bool:
    """Whether a build pass with ``remaining`` records to apply is worth worker processes:
    from ten batches, or from ``_PARALLEL_RECORDS`` if that is fewer."""
    return sum(remaining.values()) >= min(_PARALLEL_BATCHES * batch, _PARALLEL_RECORDS)


def swap_pass_bound(batch: int) -> int:
    """Build passes go on until one applies fewer records than this."""
    return min(batch, _SWAP_PASS_RECORDS)


def replay_shares(remaining: Mapping[Partition, int], workers: int) -> list[list[Partition]]:
    """Deal ``remaining`` (records left per partition) out to at most ``workers`` shares of
    about equal work: the largest partition to the least loaded share, in turn."""
    loads: list[tuple[int, list[Partition]]] = [(0, []) for _ in range(max(workers, 1))]
    for partition, count in sorted(remaining.items(), key=lambda item: (-item[1], item[0])):
        load, share = min(loads, key=lambda entry: entry[0])
        share.append(partition)
        loads[loads.index((load, share))] = (load + count, share)
    return [sorted(share) for _, share in loads if share]


async def log_ends(store: EventStore) -> dict[Partition, int]:
    """The end offset of every partition, as of now."""
    return await end_offsets(store.settings, store.layout.every_partition())


async def replay(
    store: EventStore,
    projector: Projector,
    batch: int,
    on_batch: Callable[[int], None],
    *,
    partitions: Collection[Partition] | None = None,
) -> None:
    """Apply the log (or ``partitions`` of it) to ``projector``'s schema in this process, from
    its stored offsets to the end as of now; ``on_batch`` gets each batch's record count."""
    wanted = store.layout.every_partition() if partitions is None else list(partitions)
    stored = await projector.positions.load(wanted)
    reader = store.reader(
        max_records=batch, max_bytes=REPLAY_BATCH_BYTES, quick_start=True, decode=False
    )
    await reader.start("beginning", dict(stored), partitions=wanted)
    try:
        chunks = build_batches(reader.batches_until_end(), store)
        async for chunk in read_ahead(chunks):
            await projector.handle(chunk)
            on_batch(sum(span.next - span.first for span in chunk.ranges.values()))
    finally:
        await reader.stop()


_FORKS: Final = multiprocessing.get_context("forkserver")
"""Replay workers are forked from a server process that imported this module once
(:func:`warm_workers`), not started afresh: a new interpreter spent about 0.3 s of CPU on its
imports, and three of them half a second of a two-core machine before a replay's first batch."""


def warm_workers() -> None:
    """Start the server that replay workers are forked from, unless it runs (idempotent; it
    lives as long as this process). Returns at once (starting it takes a few milliseconds):
    the server imports this module meanwhile (about 0.3 s of CPU), and the first fork waits
    for it. Three workers then fork and start in about 20 ms, where three interpreters started
    afresh took half a second to import.

    The server also imports the program's main module (guarded code does not run), which
    every worker would otherwise import again (multiprocessing's "safe importing of the main
    module"): ``backbone``'s imports its whole command line."""
    _FORKS.set_forkserver_preload(["__main__", __name__])
    multiprocessing.forkserver.ensure_running()


async def replay_in_workers(
    settings: Settings,
    schema: str,
    shares: Sequence[Sequence[Partition]],
    batch: int,
    on_batch: Callable[[int], None],
    *,
    source: SourceSpec | None = None,
    cut: Cut | None = None,
) -> float:
    """Apply each share in a worker process of its own (see the module doc), from the stored
    offsets of ``schema`` to the end as of each worker's start (or, with ``source``, that
    source up to ``cut``); ``on_batch`` as for one process. Returns the CPU seconds the workers
    spent, as each counted its own (they are the fork server's children, not this process's).

    If any worker fails or this is cancelled, every worker is stopped; what they committed stays
    (a rerun resumes from it).
    """
    warm_workers()  # a few milliseconds, and none once the server runs
    workers: list[BaseProcess] = []
    cpu = 0.0

    async def follow(share: Sequence[Partition]) -> None:
        nonlocal cpu
        job = ReplayShare(settings, schema, [(t, p) for t, p in share], batch, source, cut)
        receive, send = _FORKS.Pipe(duplex=False)
        # The job travels through the fork server's socket, never argv: the settings hold the
        # master keys.
        worker = _FORKS.Process(
            target=replay_worker_main, args=(msgspec.msgpack.encode(job), send), daemon=True
        )
        worker.start()
        workers.append(worker)
        send.close()  # the worker's end: end of file here once it exits
        with receive:
            used = await _follow_worker(receive, on_batch)
        code = await _exit_code(worker)
        if code != 0:
            raise ReplayWorkerFailed(f"replay worker of {len(share)} partitions exited with {code}")
        cpu += used

    follows = [asyncio.ensure_future(follow(share)) for share in shares]
    try:
        await asyncio.gather(*follows)
    finally:
        # The followers first: one waiting on a worker's descriptor would take the wake-up
        # from the wait below (the event loop keeps one reader per descriptor).
        for following in follows:
            following.cancel()
        await asyncio.gather(*follows, return_exceptions=True)
        for worker in workers:
            if worker.exitcode is None:
                worker.kill()
        for worker in workers:
            await _exit_code(worker)
            worker.close()
    return cpu


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable (or at its end)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _follow_worker(receive: ProcessPipe, on_batch: Callable[[int], None]) -> float:
    """Hand each record count a worker sends to ``on_batch`` until its end closes; the CPU
    seconds it reported last (0 if it failed first). Each message is a few bytes, written
    whole: readable means one is there, or the end."""
    cpu = 0.0
    while True:
        await _readable(receive.fileno())
        try:
            kind, value = receive.recv()
        except EOFError:
            return cpu
        if kind == "batch":
            on_batch(value)
        else:
            cpu = value


async def _exit_code(worker: BaseProcess) -> int:
    """The exit code of ``worker`` (negative: the signal), once it has exited."""
    if worker.exitcode is None:
        await _readable(worker.sentinel)
        worker.join()
    assert worker.exitcode is not None
    return worker.exitcode


def replay_worker_main(job: bytes, progress: ProcessPipe) -> None:
    """A replay worker process (forked from the server of :func:`warm_workers`): apply the
    :class:`ReplayShare` ``job``, sending ``("batch", records)`` for every batch applied and,
    once done, ``("cpu", seconds)``: the CPU it spent."""
    share = _SHARE.decode(job)
    run_loop(_replay_share(share, lambda count: progress.send(("batch", count))), bulk=True)
    used = resource.getrusage(resource.RUSAGE_SELF)
    progress.send(("cpu", used.ru_utime + used.ru_stime))


async def _replay_share(share: ReplayShare, report: Callable[[int], None]) -> None:
    store = await EventStore.open(share.settings, with_producer=False, migrate=False)
    async with store:
        projector = Projector(
            store.pool, store.layout, schema=share.schema, caches=None, durable_commits=False
        )
        tune_gc(bulk=True)  # again: what the store opened lives for the whole run

        if share.source is None:
            await replay(store, projector, share.batch, report, partitions=share.partitions)
            return
        async with open_source(share.source, store, share.batch) as source:
            await replay_source(
                store,
                projector,
                source,
                share.cut or Cut(None),
                report,
                partitions=share.partitions,
            )


class Rebuild:
    """One rebuild of the live schema; :meth:`run` builds, swaps and reports.

    ``redis``/``namespace``: the caches to rebuild after the swap (``None``: leave them).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        live: str = LIVE_SCHEMA,
        redis: Redis | None = None,
        namespace: str | None = None,
        batch: int = REPLAY_BATCH,
        workers: int | None = None,
        on_progress: ProgressCallback | None = None,
        source: RecordSource | None = None,
        until: Until | None = None,
        into: str | None = None,
    ) -> None:
        """``workers``: processes of the build passes (default: :func:`default_workers`; 1:
        this one).

        ``source`` (default: the log), ``until`` (default: the end), ``into`` (default: swap
        into ``live``): see the module doc.
        """
        self._store = store
        self._pool = store.pool
        self.live = checked_schema_name(live)
        self.shadow = shadow_schema(live)
        self._into = into is not None
        if into is not None:
            self.shadow = checked_schema_name(into)
            if self.shadow in (self.live, shadow_schema(live)):
                raise ProjectorError(f"cannot replay into {self.shadow}: a rebuild uses it")
        self._source = source
        self._until = until
        self._redis = redis
        self._namespace = namespace or store.settings.topic_prefix
        self._batch = batch
        self._on_progress = on_progress
        self._workers = max(workers or default_workers(), 1)
        self._projector = Projector(
            self._pool, store.layout, schema=self.shadow, caches=None, durable_commits=False
        )
        self._applied = 0
        self._total = 0
        self._started = 0.0
        self._ends: LogEnds | None = None
        """Held for the whole run: a one-off reader of the log ends took 0.2 s per pass."""

    async def run(self) -> RebuildResult:
        """Build (or resume) the shadow, swap it in, rebuild the caches, drop the old model.

        Raises :class:`RebuildRunning` if another rebuild holds the lock.
        """
        self._started = time.perf_counter()
        if self._workers > 1:
            # Build passes fork their workers from a server that imports their code once:
            # started now (a few milliseconds), it imports while the shadow is prepared.
            warm_workers()
        async with self._pool.acquire() as guard:
            if not await guard.fetchval("SELECT pg_try_advisory_lock($1)", _REBUILD_LOCK):
                raise RebuildRunning("another rebuild of this database is running")
            self._ends = LogEnds(self._store.settings, quick_start=True)
            try:
                await self._ends.start()
                return await self._locked_run()
            finally:
                await self._ends.stop()
                self._ends = None
                await guard.execute("SELECT pg_advisory_unlock($1)", _REBUILD_LOCK)

    async def _locked_run(self) -> RebuildResult:
        for leftover in await _old_schemas(self._pool, self.live):
            # A rebuild that died between its swap and the drop left this behind.
            await self._pool.execute(f"DROP SCHEMA {leftover} CASCADE")
        resumed = await self._prepare_shadow()
        # Passes until one finds little to do (swap_pass_bound), so that the swap's own pass
        # (run while the live projector waits at the lock) is short. Bounded: when writes
        # outpace this process, the swap's pass takes the remainder, so a replay finishes.
        for _ in range(_MAX_BUILD_PASSES):
            if await self._catch_up("build") < swap_pass_bound(self._batch):
                break
        await finish_build(self._pool, self.shadow)
        # Records written while the indexes were built: applied here, not under the lock.
        await self._catch_up("build")
        if self._into:
            return await self._kept(resumed)
        swapped = await self._swap()
        if self._redis is not None:
            from projectors.caches import rebuild_caches  # see the note on imports above

            await rebuild_caches(self._pool, self._redis, self._namespace, self.live)
        if swapped.replaced is not None:
            await self._pool.execute(f"DROP SCHEMA {swapped.replaced} CASCADE")
        result = RebuildResult(
            schema=self.live,
            replaced=swapped.replaced,
            resumed=resumed,
            records=self._applied,
            seconds=round(time.perf_counter() - self._started, 3),
            positions=swapped.positions,
            checksum=swapped.checksum,
        )
        log.info("rebuild.swapped", schema=self.live, records=self._applied, resumed=resumed)
        return result

    async def _kept(self, resumed: bool) -> RebuildResult:
        """The result of a build left in its own schema (``into``)."""
        async with snapshot_readers(self._pool) as readers:
            await readers.own()
            rows = await readers.connections[0].fetch(
                f"SELECT topic, partition, next_offset FROM {self.shadow}.offsets "  # noqa: S608
                "ORDER BY topic, partition"
            )
            digest = await readers.checksum(self.shadow)
        log.info("rebuild.kept", schema=self.shadow, records=self._applied, resumed=resumed)
        return RebuildResult(
            schema=self.shadow,
            replaced=None,
            resumed=resumed,
            records=self._applied,
            seconds=round(time.perf_counter() - self._started, 3),
            positions={f"{r[0]}/{r[1]}": r[2] for r in rows},
            checksum=digest,
        )

    async def _prepare_shadow(self) -> bool:
        """Create the shadow, or keep one of this version to resume; whether it resumed.

        An existing schema is dropped only if it is a read model of another version (its
        comment says so): any other schema is refused, untouched. ``--into public`` or
        ``--into ingest`` had dropped the key store or the accounts with ``CASCADE``.
        """
        epoch = await read_epoch(self._pool)
        if await schema_exists(self._pool, self.shadow):
            comment = await _schema_comment(self._pool, self.shadow)
            if comment == _VERSION_COMMENT and await self._built_in(epoch):
                applied = await self._pool.fetchval(
                    f"SELECT count(*) FROM {self.shadow}.offsets"  # noqa: S608 - checked name
                )
                return bool(applied)
            if comment is None or not comment.startswith(_READ_MODEL_COMMENT):
                raise ProjectorError(
                    f"schema {self.shadow} exists and is not a read model: choose another name"
                )
            # Left by a rebuild of another read-model version, or of another log (epoch): its
            # offsets are not positions of this log. Useless: start over.
            await self._pool.execute(f"DROP SCHEMA {self.shadow} CASCADE")
        async with self._pool.acquire() as conn, conn.transaction():
            await create_schema(conn, self.shadow, build=True)
            await conn.execute(
                f"COMMENT ON TABLE {self.shadow}.offsets IS '{_EPOCH_COMMENT}{int(epoch)}'"
            )
        return False

    async def _built_in(self, epoch: int) -> bool:
        """Whether the shadow was built from the log of ``epoch``. A shadow left by a rebuild
        that died before a ``restore-log`` holds the old log's offsets, which are not this
        log's: resumed, it had skipped partitions whose restored end lies below them and
        swapped in events no log holds (a shadow without the mark is not resumed either)."""
        comment = await self._pool.fetchval(
            "SELECT obj_description(to_regclass($1), 'pg_class')", f"{self.shadow}.offsets"
        )
        return bool(comment == f"{_EPOCH_COMMENT}{epoch}")

    async def _catch_up(self, phase: str) -> int:
        """Apply the log to the shadow from its stored offsets to the log end as of now.

        A build pass with many batches to do runs in worker processes; the rest (and the swap's
        pass, which the live projector waits for) in this process. With a ``source`` or an
        ``until`` bound, the pass reads that source up to the bound (resolved once, here).
        """
        source: RecordSource | None = None
        cut: Cut | None = None
        if self._source is not None or self._until is not None:
            source = self._source or KafkaSource(self._store, batch=self._batch)
            cut = await resolve_cut(self._until, source, self._store)
            ends = await source.ends()
        else:
            assert self._ends is not None, "started by run()"
            ends = await self._ends.end_offsets(self._store.layout.every_partition())
        stored = await self._projector.positions.load(sorted(ends))
        # An upper bound with ``until`` (the records after the bound are not applied).
        remaining = {p: end - stored.get(p, 0) for p, end in ends.items() if end > stored.get(p, 0)}
        self._total = self._applied + sum(remaining.values())
        if not remaining:
            # Nothing to apply: no reader is started (a Kafka consumer's start and stop took
            # about 0.3 s, three times per rebuild, once of them under the swap's lock).
            self._report(phase)
            return 0
        applied = 0

        def on_batch(count: int) -> None:
            nonlocal applied
            applied += count
            self._applied += count
            self._report(phase)

        # Workers cost a start (connections and a reader each): only a long pass is worth it (and
        # short passes while writes go on must stay short, or they would never get below a batch).
        if phase == "build" and self._workers > 1 and goes_parallel(remaining, self._batch):
            await replay_in_workers(
                self._store.settings,
                self.shadow,
                replay_shares(remaining, self._workers),
                self._batch,
                on_batch,
                source=None if source is None else source.spec,
                cut=cut,
            )
        elif source is None:
            await replay(self._store, self._projector, self._batch, on_batch)
        else:
            await replay_source(self._store, self._projector, source, cut or Cut(None), on_batch)
        self._report(phase)
        return applied

    def _report(self, phase: str) -> None:
        if self._on_progress is not None:
            seconds = time.perf_counter() - self._started
            self._on_progress(Progress(phase, self._applied, self._total, seconds))

    async def _swap(self) -> _Swapped:
        """Swap the caught-up shadow in, as the module doc describes."""
        live, shadow = self.live, self.shadow
        replaced: str | None = None
        # The readers' transactions take no snapshot yet: the swap's must be their first.
        async with self._pool.acquire() as swap, snapshot_readers(self._pool) as readers:
            async with swap.transaction():
                if await schema_exists(swap, live):
                    await swap.execute(f"LOCK TABLE {live}.offsets IN ACCESS EXCLUSIVE MODE")
                    replaced = checked_schema_name(f"{live}_old_{int(time.time() * 1000)}")
                await self._catch_up("swap")
                if replaced is not None:
                    await swap.execute(f"ALTER SCHEMA {live} RENAME TO {replaced}")
                await swap.execute(f"ALTER SCHEMA {shadow} RENAME TO {live}")
                await readers.adopt(await swap.fetchval("SELECT pg_export_snapshot()"))
            rows = await readers.connections[0].fetch(
                f"SELECT topic, partition, next_offset FROM {live}.offsets "  # noqa: S608
                "ORDER BY topic, partition"
            )
            digest = await readers.checksum(live)
        return _Swapped(replaced, {f"{r[0]}/{r[1]}": r[2] for r in rows}, digest)
