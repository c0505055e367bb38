"""``backbone bench ingest``: durable sends per second through the real ingest processes.

One run, on the local stack, in a database and topics of its own, with real tier processes
(``python -m projectors``, ``python -m ingest``) and ``wrk`` (from Debian's packages, installed
when missing) as the load generator on the other core. Subjects:

1. the bare-handler ceiling: an aiohttp handler that only verifies the JWT and decodes the body
   (:mod:`ops.bench.bare`), one process;
2. raw aiokafka at acks=all producing records of the same size, closed loop, in-process;
3. ingest, one process, everything on (JWT + live session check, rate limit, membership
   check, idempotency row, validation, sealing, durable produce): the maximum rate;
4. the same at half that rate (paced), for p50/p99; then again with the projector following
   the sends;
5. the batch path (``messages:batch``, 100 messages a request), messages per second;
6. ingest with two processes sharing the port (``SO_REUSEPORT``), total and per process.

Subjects 1 and 3 alternate, ``--rounds`` rounds each, and each figure sums its rounds: a busy
host slows whichever subject it meets (a reference loop here ran anywhere from 28 to 55 ns an
iteration), and alternating spreads those spells over both, where two long runs in a row
compared a quiet spell with a busy one. The ratio of every round is in the JSON too.

Each single-process subject (1, 3, 4, 5) runs alone on one core while the load generator, the
servers and the projector share the others (:class:`~ops.bench.cores.CoreSplit`): the issue's
ceiling is measured "with wrk on the other core", and left to the scheduler the serving
process got 0.8-0.9 of its core, shared with whichever server landed beside it. ``--no-split``
leaves every process free to run anywhere.

The projector runs first, to build the membership cache that sends are checked against, and is
then stopped (gracefully: SIGTERM, after its batch in flight) for every subject but the second
half-rate one, for which it is started again, as the tiers not under test (fan-out, archiver)
do not run either. Following a thousand sends a second, it puts its own work, PostgreSQL's and
its Kafka fetches on the core Kafka and Redis answer the sends from: in alternating runs the
half-rate p99 was 39.5-46.9 ms with it following and 11.0-15.5 ms without. The second half-rate
subject keeps that cost in view; it starts once the restarted projector has caught up with the
sends of the subjects before.

``--profile`` samples the single ingest process with py-spy during its first round of subject
3 and prints where its time goes (self time per function).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
from aiokafka import AIOKafkaProducer

from eventstore import Settings, TopicLayout, create_pool, load_settings, provision_topics
from eventstore.ends import end_offsets
from eventstore.producer import default_producer_factory
from eventstore.runtime import NICE_ENV
from ops.bench.cores import CoreSplit, stack_pids
from ops.bench.project import applied_offsets, delete_topics_and_caches
from ops.bench.report import CpuMeter, Figures, figures, table, write_json
from ops.environment import stack_env
from ops.provision import migrate_all
from ops.stack import default_stack_dir, stack_up
from ops.stack.install import apt_install
from ops.stack.ports import ephemeral_port
from ops.up import BACKGROUND_NICE
from schemas import MessageSent, format_time, new_event_id, utc_now

CONTENT = "x" * 256

WRK_SCRIPT = r"""
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local counter = 0
local convs = {}
for c in string.gmatch(os.getenv("BENCH_CONVS"), "[^,]+") do table.insert(convs, c) end
local auth = "Bearer " .. os.getenv("BENCH_TOKEN")
local content = os.getenv("BENCH_CONTENT")
local batch = tonumber(os.getenv("BENCH_BATCH") or "0")
local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local run = os.getenv("BENCH_RUN")
local headers = {["Content-Type"] = "application/json", ["Authorization"] = auth}

local function message(n, i)
  return '{"client_msg_id":"' .. run .. "-" .. tid .. "-" .. n .. "-" .. i ..
         '","content":"' .. content .. '"}'
end

request = function()
  counter = counter + 1
  local conv = convs[(counter % #convs) + 1]
  if batch > 0 then
    local parts = {}
    for i = 1, batch do parts[i] = message(counter, i) end
    return wrk.format("POST", "/v1/conversations/" .. conv .. "/messages:batch", headers,
                      '{"messages":[' .. table.concat(parts, ",") .. "]}")
  end
  return wrk.format("POST", "/v1/conversations/" .. conv .. "/messages", headers,
                    message(counter, 0))
end

if pace > 0 then
  -- Uniform in [0, 2 * pace]: the same mean rate, without every connection firing in step
  -- (a fixed delay makes all connections send together, a burst every period).
  local seeded = false
  delay = function()
    if not seeded then
      math.randomseed(os.time() * 100 + tid)
      seeded = true
    end
    return math.random(0, 2 * pace)
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bad_status":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class WrkResult(msgspec.Struct, frozen=True):
    requests: int
    duration_us: int
    bad_status: int
    socket_errors: int
    p50_us: int
    p99_us: int
    max_us: int

    @property
    def rate(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @classmethod
    def combined(cls, runs: Sequence[WrkResult]) -> WrkResult:
        """Several runs as one: counts and durations added; of the latencies, the median
        run's p50 and the worst p99 and maximum (percentiles of the union are not known)."""
        return cls(
            requests=sum(r.requests for r in runs),
            duration_us=sum(r.duration_us for r in runs),
            bad_status=sum(r.bad_status for r in runs),
            socket_errors=sum(r.socket_errors for r in runs),
            p50_us=round(statistics.median(r.p50_us for r in runs)),
            p99_us=max(r.p99_us for r in runs),
            max_us=max(r.max_us for r in runs),
        )


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        apt_install(["wrk"], Path(tempfile.gettempdir()) / "backbone-apt-wrk.log")
        found = shutil.which("wrk")
    if found is None:
        raise SystemExit("bench ingest: wrk could not be installed")
    return found


def run_wrk(
    url: str,
    env: Mapping[str, str],
    *,
    seconds: float,
    connections: int,
    threads: int = 2,
) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        completed = subprocess.run(
            [
                ensure_wrk(),
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                url,
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        )
    finally:
        os.unlink(script.name)
    match = re.search(r"^BENCH (\{.*\})$", completed.stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"bench ingest: wrk printed no result:\n{completed.stdout}")
    return msgspec.json.decode(match.group(1), type=WrkResult)


def _figures(name: str, result: WrkResult, per: int = 1, note: str = "") -> Figures:
    seconds = result.duration_us / 1e6
    good = (result.requests - result.bad_status) * per
    errors = f"{result.bad_status} non-2xx, {result.socket_errors} socket errors"
    return Figures(
        name=name,
        count=good,
        seconds=round(seconds, 2),
        per_second=round(good / seconds, 1),
        p50_ms=round(result.p50_us / 1000, 2),
        p99_ms=round(result.p99_us / 1000, 2),
        max_ms=round(result.max_us / 1000, 2),
        note=f"{note}; {errors}" if note else errors,
    )


# --- the deployment under test ---------------------------------------------------------------


class Deployment:
    """A database and topics of the bench's own, and the tier processes over them."""

    def __init__(self, env: dict[str, str], settings: Settings, workdir: Path) -> None:
        self.env = env
        self.settings = settings
        self.workdir = workdir
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = collections.defaultdict(list)
        self.logs: dict[int, Path] = {}
        """Pid -> the log of that process (a process started again gets a log of its own)."""

    def spawn(self, name: str, argv: Sequence[str], extra: Mapping[str, str] | None = None) -> int:
        log_path = self.workdir / f"{name}-{len(self.logs)}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, *argv],
                env={**self.env, **(extra or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name].append(proc)
        self.logs[proc.pid] = log_path
        return proc.pid

    def spawn_projector(self) -> int:
        """The projector tier, at the niceness ``backbone up`` gives it."""
        return self.spawn("projectors", ["-m", "projectors"], {NICE_ENV: str(BACKGROUND_NICE)})

    def stop(self, name: str) -> None:
        _terminate(self.procs.pop(name, []))

    def stop_all(self) -> None:
        _terminate([p for group in self.procs.values() for p in group])
        self.procs.clear()


def _terminate(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _caught_up(dep: Deployment, within: float = 300.0) -> None:
    """Wait until the projector has applied everything in the log so far (nothing is sent
    meanwhile, so the log's end is read once)."""
    (proc,) = dep.procs["projectors"]
    layout = TopicLayout.from_settings(dep.settings)
    ends = await end_offsets(dep.settings, layout.every_partition())
    deadline = time.monotonic() + within
    pool = await create_pool(dep.settings.postgres_dsn, min_size=1, max_size=1)
    try:
        while True:
            applied = await applied_offsets(pool)
            behind = sum(max(end - applied.get(p, 0), 0) for p, end in ends.items())
            if not behind:
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                log = dep.logs[proc.pid]
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise SystemExit(
                    f"bench ingest: the projector (exit code {proc.poll()}) did not catch up "
                    f"within {within:g} s: {behind} records behind; its log ends:\n{tail}"
                )
            await asyncio.sleep(0.1)
    finally:
        await pool.close()


async def _wait_ready(url: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"bench ingest: {url} did not become ready")
            await asyncio.sleep(0.2)


def _wait_port(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench ingest: nothing listens on {port}")
        time.sleep(0.1)


async def _prepare_user(base: str, conversations: int) -> tuple[str, list[str]]:
    name = f"bench{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    async with aiohttp.ClientSession(base) as http:
        body = {"username": name, "email": f"{name}@bench.test", "password": password}
        async with http.post("/v1/auth/register", json=body) as response:
            assert response.status == 201, await response.text()
        async with http.post("/v1/auth/login", json={"login": name, "password": password}) as r:
            token: str = (await r.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        convs = []
        for n in range(conversations):
            async with http.post("/v1/conversations", json={"name": f"b{n}"}, headers=headers) as r:
                assert r.status == 201, await r.text()
                convs.append((await r.json())["conversation_id"])
        # The first post per conversation waits for the projection (read-your-writes).
        for cid in convs:
            body = {"client_msg_id": f"warm-{cid}", "content": "warm"}
            async with http.post(
                f"/v1/conversations/{cid}/messages", json=body, headers=headers
            ) as r:
                assert r.status == 202, await r.text()
    return token, convs


async def _raw_kafka(settings: Settings, total: int, concurrency: int) -> Figures:
    """Raw aiokafka, acks=all, idempotent: records the size of a sealed 256-byte message."""
    topic = TopicLayout.from_settings(settings).topic("conversation")
    producer: AIOKafkaProducer = default_producer_factory(settings)()
    await producer.start()
    rooms = [uuid.uuid4() for _ in range(64)]
    sender = uuid.uuid4()
    body = "y" * 400  # a sealed 256-character body is about this long
    encoder = msgspec.json.Encoder()
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            room = rooms[i % len(rooms)]
            event = MessageSent(
                conversation_id=room,
                message_id=uuid.uuid4(),
                sender_id=sender,
                client_msg_id=f"r{i}",
                body=body,
            )
            key = str(room).encode()
            headers = [
                ("ce_id", str(new_event_id()).encode()),
                ("ce_type", b"chat.message.sent"),
                ("ce_time", format_time(utc_now()).encode()),
            ]
            t0 = time.perf_counter()
            await (await producer.send(topic, encoder.encode(event), key=key, headers=headers))
            latencies.append(time.perf_counter() - t0)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await producer.stop()
    return figures(
        "raw aiokafka acks=all (reference)", latencies, seconds, "in-process, closed loop"
    )


@contextlib.contextmanager
def deployment(args: argparse.Namespace) -> Iterator[Deployment]:
    info = stack_up(default_stack_dir())
    env = stack_env(info)
    base = load_settings(env)
    name = f"bench_{uuid.uuid4().hex[:10]}"
    head, _, _ = base.postgres_dsn.rpartition("/")

    async def create() -> Settings:
        conn = await asyncpg.connect(base.postgres_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        settings = msgspec.structs.replace(
            base, postgres_dsn=f"{head}/{name}", topic_prefix=f"bench{uuid.uuid4().hex[:8]}"
        )
        await migrate_all(settings.postgres_dsn)
        await provision_topics(settings.kafka_bootstrap, TopicLayout.from_settings(settings))
        return settings

    async def drop(settings: Settings) -> None:
        conn = await asyncpg.connect(base.postgres_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        await delete_topics_and_caches(settings)

    settings = asyncio.run(create())
    env.update(
        BACKBONE_POSTGRES_DSN=settings.postgres_dsn,
        BACKBONE_TOPIC_PREFIX=settings.topic_prefix,
        BACKBONE_INGEST_PORT=str(args.port or ephemeral_port()),
        BACKBONE_LOG_LEVEL="warning",
        # Limits stay on (every request runs the script) but are set above the offered load.
        BACKBONE_RATE_LIMITS=json.dumps(
            {
                c: {
                    "per_user": {"rate": 1e6, "burst": 1_000_000},
                    "per_ip": {"rate": 1e6, "burst": 1_000_000},
                }
                for c in ("message", "write", "read")
            }
        ),
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as workdir:
        running = Deployment(env, settings, Path(workdir))
        try:
            yield running
        finally:
            running.stop_all()
            asyncio.run(drop(settings))


def _profile(pid: int, seconds: float, out: Path) -> list[tuple[str, float]]:
    """Sample ``pid`` with py-spy for ``seconds``; the functions with the most self time."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    subprocess.run(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        check=True,
        capture_output=True,
    )
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_FRAME.sub(r" (\1)", f) for f in stack.split(";")]
        own["self: " + frames[-1]] += int(count)
        for name in {f for f in frames if _OURS.search(f)}:
            within["incl: " + name] += int(count)
        total += int(count)
    if not total:
        return []
    top = own.most_common(12) + within.most_common(12)
    return [(name, 100 * n / total) for name, n in top]


_FRAME = re.compile(r" \((?:[^()]*/)?([^/()]+\.py):\d+\)")
_OURS = re.compile(r"\((app|commands|security|http|checks|producer|codec|keyring|deadlines)\.py\)")


def run(args: argparse.Namespace) -> int:
    rows: list[Figures] = []
    extra: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    with deployment(args) as dep:
        port = dep.env["BACKBONE_INGEST_PORT"]
        base = f"http://127.0.0.1:{port}"
        dep.spawn_projector()
        dep.spawn("ingest", ["-m", "ingest"])
        asyncio.run(_wait_ready(base + "/readyz"))
        token, convs = asyncio.run(_prepare_user(base, args.conversations))
        wrk_env = {
            "BENCH_TOKEN": token,
            "BENCH_CONVS": ",".join(convs),
            "BENCH_CONTENT": CONTENT,
        }
        seconds, conns = args.seconds, args.connections
        others = [os.getpid(), *stack_pids(default_stack_dir())]

        def split(pid: int) -> contextlib.AbstractContextManager[None]:
            """``pid`` alone on its core for the block (unless ``--no-split``)."""
            return contextlib.nullcontext() if args.no_split else CoreSplit(pid, others)()

        # The projector has built the membership cache the sends are checked against; it is
        # stopped while ingest is measured, but for one subject (see the module doc).
        dep.stop("projectors")
        # 1 and 3: the framework's ceiling and ingest at its maximum rate, in alternating
        # rounds, so that both meet the same spells of a busy host (see the module doc).
        bare_port = ephemeral_port()
        dep.spawn("bare", ["-m", "ops.bench.bare", str(bare_port)])
        _wait_port(bare_port)
        bare_pid = dep.procs["bare"][0].pid
        ingest_pid = dep.procs["ingest"][0].pid
        bare_cpu, ingest_cpu = CpuMeter(bare_pid), CpuMeter(ingest_pid)
        round_seconds = max(1.0, seconds / args.rounds)
        profile_out = dep.workdir / "profile.txt"
        profiler = None
        bare_runs: list[WrkResult] = []
        one_runs: list[WrkResult] = []
        for n in range(args.rounds):
            with split(bare_pid):
                bare_runs.append(
                    run_wrk(
                        f"http://127.0.0.1:{bare_port}",
                        {**wrk_env, "BENCH_RUN": f"bare{n}"},
                        seconds=round_seconds,
                        connections=conns,
                    )
                )
            if args.profile and profiler is None:
                profiler = _Profiler(ingest_pid, round_seconds, profile_out)
            with split(ingest_pid):
                one_runs.append(
                    run_wrk(
                        base,
                        {**wrk_env, "BENCH_RUN": f"one{n}{uuid.uuid4().hex[:6]}"},
                        seconds=round_seconds,
                        connections=conns,
                    )
                )
        bare, one = WrkResult.combined(bare_runs), WrkResult.combined(one_runs)
        cpu["bare"] = bare_cpu.per(bare.requests)
        cpu["ingest"] = ingest_cpu.per(one.requests)
        dep.stop("bare")
        extra["round_ratios"] = [
            round(o.rate / b.rate, 3) if b.rate else None
            for b, o in zip(bare_runs, one_runs, strict=True)
        ]
        rows.append(_figures("bare aiohttp: JWT + decode (ceiling)", bare))

        # 2. Raw Kafka at the same acks.
        rows.append(asyncio.run(_raw_kafka(dep.settings, args.raw_events, conns)))

        rows.append(_figures("ingest x1: max rate", one, note="everything on"))
        if profiler is not None:
            extra["profile_self_time_pct"] = profiler.result()

        # 4. Half the maximum rate, paced, for latency: ingest alone, then with the projector
        # following the sends once it has caught up with those of the subjects before.
        rate = one.rate / 2
        paced_conns = 32
        delay_ms = max(1, round(1000 * paced_conns / rate))

        def half_rate(tag: str) -> WrkResult:
            with split(ingest_pid):
                return run_wrk(
                    base,
                    {
                        **wrk_env,
                        "BENCH_RUN": f"{tag}{uuid.uuid4().hex[:6]}",
                        "BENCH_DELAY_MS": str(delay_ms),
                    },
                    seconds=seconds,
                    connections=paced_conns,
                )

        half = half_rate("half")
        rows.append(_figures("ingest x1: half max rate", half, note=f"target {rate:.0f}/s"))
        dep.spawn_projector()
        asyncio.run(_caught_up(dep))
        following = half_rate("follow")
        rows.append(
            _figures(
                "ingest x1: half rate, projector following",
                following,
                note=f"target {rate:.0f}/s",
            )
        )

        dep.stop("projectors")
        # 5. The batch path.
        with split(ingest_pid):
            batch = run_wrk(
                base,
                {
                    **wrk_env,
                    "BENCH_RUN": f"batch{uuid.uuid4().hex[:6]}",
                    "BENCH_BATCH": str(args.batch),
                },
                seconds=seconds,
                connections=16,
            )
        rows.append(
            _figures(
                f"ingest x1: batch path, {args.batch}/request",
                batch,
                per=args.batch,
                note="messages",
            )
        )

        # 6. Two processes on one port.
        dep.spawn("ingest", ["-m", "ingest"])
        asyncio.run(_wait_ready(base + "/readyz"))
        two = run_wrk(
            base,
            {**wrk_env, "BENCH_RUN": f"two{uuid.uuid4().hex[:6]}"},
            seconds=seconds,
            connections=conns,
        )
        both = _figures("ingest x2: max rate (total)", two, note="everything on")
        rows.append(both)
        rows.append(
            msgspec.structs.replace(
                both,
                name="ingest x2: per process",
                count=both.count // 2,
                per_second=round(both.per_second / 2, 1),
            )
        )

    ceiling = rows[0].per_second
    single = rows[2].per_second
    extra["ratio_vs_bare"] = round(single / ceiling, 3) if ceiling else None
    print(table(rows))
    print(f"ingest x1 / bare ceiling: {100 * (extra['ratio_vs_bare'] or 0):.1f}% (goal >= 70%)")
    rounds = ", ".join(f"{100 * r:.0f}%" for r in extra["round_ratios"] if r is not None)
    print(f"  round by round: {rounds}")
    # CPU time of the serving process per request: what each costs in that process alone,
    # whatever the other processes on the two cores (projector, PostgreSQL, Kafka) took.
    extra["cpu_us_per_request"] = cpu
    if cpu.get("ingest"):
        print(
            f"CPU per request in the serving process: ingest {cpu['ingest']:.0f} µs, bare "
            f"handler {cpu['bare']:.0f} µs ({cpu['bare'] / cpu['ingest']:.1%} of ingest's)"
        )
    if "profile_self_time_pct" in extra:
        print("where one ingest process spends its time (self, % of samples):")
        for name, pct in extra["profile_self_time_pct"]:
            print(f"  {pct:5.1f}%  {name}")
    params = {
        "seconds": seconds,
        "connections": conns,
        "conversations": args.conversations,
        "content_bytes": len(CONTENT),
        "batch": args.batch,
        "rounds": args.rounds,
        "split": not args.no_split,
    }
    write_json(Path(args.json), "ingest", params, rows, extra)
    print(f"wrote {args.json}")
    return 0


class _Profiler:
    """py-spy sampling a process in a background thread while the load runs."""

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = self._pool.submit(_profile, pid, max(1.0, seconds - 1), out)

    def result(self) -> list[tuple[str, float]]:
        try:
            return self._future.result(timeout=120)
        finally:
            self._pool.shutdown()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("ingest", help="durable HTTP sends per second", description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="length of each subject's load, in all"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="the ceiling and ingest's maximum rate alternate in this many rounds each",
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--raw-events", type=int, default=20000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="sample ingest with py-spy")
    parser.add_argument(
        "--no-split",
        action="store_true",
        help="leave every process free to run on any core (default: each single-process "
        "subject alone on one core, the load generator and the servers on the others)",
    )
    parser.add_argument("--json", default="bench-results/ingest.json")
    parser.set_defaults(func=run)
