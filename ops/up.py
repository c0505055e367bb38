"""``backbone up``: the whole system on this machine, in the foreground.

Starts (or reuses) the local stack, applies migrations and creates topics, then runs every
tier that exists in this checkout as supervised processes, prints where to reach everything,
and runs until Ctrl-C (or SIGTERM), when it stops the tiers and the stack servers it started
itself. Stack parts that already ran before ``up`` are left running. The clean-up runs on every
exit: a part failing to start, provisioning failing, the supervisor failing, or a signal at any
time. A signal during ``stack_up`` takes effect once the parts being started are up (or have
failed): starts run in worker threads that cannot be interrupted, and cleaning up while they
still run could miss a server they start a moment later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ops.environment import stack_env
from ops.provision import post_up
from ops.stack import StackInfo, default_stack_dir, stack_down, stack_status, stack_up
from ops.stack.lifecycle import PARTS
from ops.supervisor import Supervisor, Tier

BACKGROUND_NICE = 10
"""Niceness of the background tiers (projectors, archiver)."""


def tiers(args: argparse.Namespace) -> list[Tier]:
    """The tiers ``up`` runs, in start order (those whose code exists in this checkout)."""
    declared = [
        # Projectors and the archiver are background work: they yield the CPU to the tiers
        # clients wait on (see eventstore.runtime.run).
        Tier("projectors", "projectors", copies=args.projector_workers, nice=BACKGROUND_NICE),
        Tier(
            "ingest",
            "ingest",
            copies=args.ingest_workers,
            url=f"http://127.0.0.1:{args.ingest_port}/v1",
        ),
        Tier(
            "fanout",
            "fanout",
            copies=args.fanout_workers,
            url=f"ws://127.0.0.1:{args.fanout_port}/v1/ws",
        ),
        Tier("archiver", "ops.archiver", copies=1, nice=BACKGROUND_NICE),
    ]
    return [t for t in declared if t.available()]


def describe(info: StackInfo, running: list[Tier]) -> str:
    lines = [
        "backbone is up:",
        f"  kafka       {info.kafka_bootstrap}",
        f"  postgres    {info.postgres_dsn}",
        f"  redis       {info.redis_url}",
        f"  s3          {info.s3_endpoint}",
    ]
    for tier in running:
        lines.append(f"  {tier.name:<11} {tier.url or 'running'} (x{tier.copies})")
    missing = {"ingest", "projectors", "fanout"} - {t.name for t in running}
    if missing:
        lines.append(f"  not built yet: {', '.join(sorted(missing))} (the stack runs without them)")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def running_parts(data_dir: Path) -> set[str]:
    """The stack parts (``kafka``, ``postgres``, ...) with at least one server running."""
    return {
        part
        for row in stack_status(data_dir)
        if row.running
        for part in PARTS
        if row.name == part or row.name.startswith(f"{part}-")
    }


class StopRequests:
    """SIGINT and SIGTERM for ``up``: what a stop request does depends on the phase.

    By default it raises KeyboardInterrupt (start-up is abandoned, the clean-up runs); while
    :meth:`deferred` it is only recorded (checked with :meth:`check`); while a stop callback is
    set (the supervisor runs) it calls that.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.on_stop: Callable[[], None] | None = None
        self._deferring = 0
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.on_stop is not None:
            self.on_stop()
        elif self._deferring:
            print(f"up: {signal.Signals(signum).name}; stopping shortly", file=sys.stderr)
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was requested while deferred."""
        if self.requested:
            raise KeyboardInterrupt


def run_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir) if args.dir else default_stack_dir()
    stops = StopRequests()
    stops.install()
    try:
        with stops.deferred():
            before = running_parts(data_dir)
        try:
            return start_and_supervise(args, data_dir, stops)
        except KeyboardInterrupt:
            print("up: interrupted", file=sys.stderr)
            return 130
        finally:
            with stops.deferred():
                clean_up(data_dir, before)
    finally:
        stops.restore()


def start_and_supervise(args: argparse.Namespace, data_dir: Path, stops: StopRequests) -> int:
    with stops.deferred():
        info = stack_up(data_dir, brokers=args.brokers)
    stops.check()
    post_up(info)
    env = stack_env(info)
    env["BACKBONE_INGEST_PORT"] = str(args.ingest_port)
    env["BACKBONE_FANOUT_PORT"] = str(args.fanout_port)
    running = tiers(args)
    print(describe(info, running), flush=True)

    async def supervise() -> None:
        supervisor = Supervisor(running, env)
        loop = asyncio.get_running_loop()

        def on_stop() -> None:
            loop.call_soon_threadsafe(supervisor.stop)

        stops.on_stop = on_stop
        try:
            stops.check()
            await supervisor.run()
        finally:
            stops.on_stop = None

    asyncio.run(supervise())
    print("up: tiers stopped", file=sys.stderr)
    return 0


def clean_up(data_dir: Path, before: set[str]) -> None:
    """Stop the stack parts ``up`` started itself: those none of whose servers ran before."""
    started = tuple(part for part in PARTS if part not in before)
    if started:
        stack_down(data_dir, parts=started)
        print(f"up: stopped {', '.join(started)}", file=sys.stderr)
    if before:
        print(f"up: {', '.join(sorted(before))} ran before `up`; left running", file=sys.stderr)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "up", help="run the whole system in the foreground", description=__doc__
    )
    parser.add_argument("--dir", help="stack data directory (default: .stack)")
    parser.add_argument("--brokers", type=int, default=1, choices=(1, 3))
    parser.add_argument("--ingest-workers", type=int, default=1)
    parser.add_argument("--projector-workers", type=int, default=1)
    parser.add_argument("--fanout-workers", type=int, default=1)
    parser.add_argument("--ingest-port", type=int, default=8080)
    parser.add_argument("--fanout-port", type=int, default=8090)
    parser.set_defaults(func=run_up)
