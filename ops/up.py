"""``backbone up``: the whole system on this machine, in the foreground.

Starts (or reuses) the local stack, applies migrations and creates topics, then runs every
tier that exists in this checkout as supervised processes, prints where to reach everything,
and runs until Ctrl-C, when it stops the tiers and the stack servers it started itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from ops.environment import stack_env
from ops.provision import post_up
from ops.stack import StackInfo, default_stack_dir, stack_down, stack_status, stack_up
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


def run_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir) if args.dir else default_stack_dir()
    was_running = {p.name for p in stack_status(data_dir) if p.running}
    info = stack_up(data_dir, brokers=args.brokers)
    post_up(info)
    env = stack_env(info)
    env["BACKBONE_INGEST_PORT"] = str(args.ingest_port)
    env["BACKBONE_FANOUT_PORT"] = str(args.fanout_port)
    running = tiers(args)
    print(describe(info, running), flush=True)

    async def supervise() -> None:
        supervisor = Supervisor(running, env)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, supervisor.stop)
        await supervisor.run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(supervise())
    print("up: tiers stopped", file=sys.stderr)
    if not was_running:
        stack_down(data_dir)
        print("up: stack stopped", file=sys.stderr)
    else:
        print("up: the stack was running before `up`; left running", file=sys.stderr)
    return 0


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
