"""``backbone status``: which parts are up, the log epoch, how far behind the projector is.

Three sections: every part of the local stack (as ``backbone stack status`` reports it, when
this machine has one), the log's current epoch (positions carry it), and per partition the
live projector's last-applied position and lag: the log end (``LogEnds``) minus the next
offset the read model will apply (``chat.offsets``). Lag is read from the stores, not from a
worker, so it is right even when no projector runs (then it grows). Exit status 1 when a part
is down or a store cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import msgspec

from eventstore import (
    EventStoreError,
    Position,
    Settings,
    TopicLayout,
    create_pool,
    read_epoch,
)
from eventstore.ends import end_offsets
from ops.deployment import command_settings
from ops.stack import PartStatus, default_stack_dir, stack_status
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import in_schema, schema_exists


class PartitionLag(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    end: int
    """The next offset to be written to the partition."""
    applied: int
    """The next offset the read model will apply (0: nothing applied yet)."""
    lag: int
    last_applied: str | None
    """Position token of the last record applied, if any."""


class ProjectorStatus(msgspec.Struct, frozen=True):
    schema: str
    epoch: int
    lag: int
    partitions: list[PartitionLag]


async def projector_status(settings: Settings, schema: str = LIVE_SCHEMA) -> ProjectorStatus:
    """The epoch and every partition's lag and last-applied position for ``schema``."""
    layout = TopicLayout.from_settings(settings)
    partitions = layout.every_partition()
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        epoch = await read_epoch(pool)
        applied: dict[tuple[str, int], int] = {}
        if await schema_exists(pool, schema):
            rows = await pool.fetch(
                in_schema(schema, "SELECT topic, partition, next_offset FROM {schema}.offsets")
            )
            applied = {(r[0], r[1]): r[2] for r in rows}
    finally:
        await pool.close()
    ends = await end_offsets(settings, partitions)
    rows_out: list[PartitionLag] = []
    for topic, partition in partitions:
        end = ends.get((topic, partition), 0)
        next_offset = applied.get((topic, partition), 0)
        last = (
            Position(epoch, layout.stream_of(topic), partition, next_offset - 1).token()
            if next_offset
            else None
        )
        rows_out.append(
            PartitionLag(topic, partition, end, next_offset, max(end - next_offset, 0), last)
        )
    return ProjectorStatus(schema, epoch, sum(r.lag for r in rows_out), rows_out)


def _stack_rows() -> list[PartStatus]:
    data_dir = default_stack_dir()
    return stack_status(data_dir) if data_dir.exists() else []


def _part(row: PartStatus) -> dict[str, object]:
    return {"name": row.name, "address": row.address, "running": row.running, "pid": row.pid}


def render(parts: list[PartStatus], status: ProjectorStatus | None, error: str | None) -> str:
    lines: list[str] = []
    if parts:
        lines.append(f"{'PART':<10} {'ADDRESS':<22} {'STATE':<5} {'PID':>7}")
        for r in parts:
            lines.append(
                f"{r.name:<10} {r.address:<22} {'up' if r.running else 'down':<5} {r.pid or '-':>7}"
            )
        lines.append("")
    if status is None:
        lines.append(f"projector: unknown ({error})")
        return "\n".join(lines)
    lines.append(f"epoch {status.epoch}; projector {status.schema}: lag {status.lag:,} records")
    lines.append(f"{'TOPIC':<28} {'PART':>4} {'END':>10} {'APPLIED':>10} {'LAG':>8}  LAST APPLIED")
    for p in status.partitions:
        lines.append(
            f"{p.topic:<28} {p.partition:>4} {p.end:>10} {p.applied:>10} {p.lag:>8}  "
            f"{p.last_applied or '-'}"
        )
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    parts = _stack_rows()
    status: ProjectorStatus | None = None
    error: str | None = None
    try:
        status = asyncio.run(projector_status(command_settings()))
    except EventStoreError as exc:
        error = str(exc)
    if args.json:
        document = {
            "stack": [_part(r) for r in parts],
            "epoch": status.epoch if status else None,
            "projector": msgspec.to_builtins(status) if status else None,
            "error": error,
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(parts, status, error))
    if error is not None:
        print(f"backbone status: {error}", file=sys.stderr)
    return 0 if status is not None and all(r.running for r in parts) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "status", help="stack parts, log epoch, projector lag per partition", description=__doc__
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run_status)
