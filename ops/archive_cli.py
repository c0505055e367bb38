"""``backbone archive verify``: recompute every hash chain of the S3 archive.

Reads every manifest and segment under the archive's prefix, recomputes each segment's sha256
and each partition's chain, and names every segment that is missing (offsets in no segment, a
manifest without its body), altered (bytes changed), reordered (stored under another segment's
name), extra (overlapping or stray) or whose link is broken, and every partition that lost all
its objects: one the archive recorded as holding segments (``_meta/started``), or, in an
archive written before those records, one numbered below a partition of its topic with
segments. The partition counts of the settings (``BACKBONE_USER_PARTITIONS`` /
``_CONVERSATION_PARTITIONS``) name the partitions to look for; one without objects that nothing
shows held a record is listed as empty. A body without manifest at the very tail is reported
as pending (an archiver is between its two writes) and is not an error.
Exit status 0 when the archive is sound, 1 when anything is wrong, 2 when it cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import msgspec

from eventstore import EventStoreError, Settings, TopicLayout
from eventstore.archive import Archive, ArchiveConfig, Verification, verify_archive
from eventstore.objects import s3_client
from eventstore.runtime import run_command
from ops.deployment import command_settings


async def verify(settings: Settings, config: ArchiveConfig) -> Verification:
    client = s3_client(settings)
    try:
        return await verify_archive(
            Archive(client, config.bucket, config.prefix),
            layout=TopicLayout.from_settings(settings),
        )
    finally:
        await asyncio.to_thread(client.close)


def report(result: Verification, config: ArchiveConfig) -> str:
    lines = [f"archive s3://{config.bucket}/{config.prefix}/"]
    for chain in result.chains:
        span = "empty" if chain.next is None else f"offsets {chain.first}..{chain.next - 1}"
        lines.append(
            f"  {chain.topic}/{chain.partition}: {chain.segments} segments, "
            f"{chain.records:,} records, {span}"
        )
    for problem in result.problems:
        lines.append(
            f"{problem.kind.upper():<9} {problem.topic}/{problem.partition}/{problem.name}: "
            f"{problem.detail}"
        )
    fatal = sum(1 for p in result.problems if p.kind != "pending")
    lines.append("OK: every chain verifies" if result.ok else f"FAILED: {fatal} problem(s)")
    return "\n".join(lines)


def command_archive_config(settings: Settings, args: argparse.Namespace) -> ArchiveConfig:
    """The archive from the environment, with a command's ``--prefix``/``--bucket`` over it."""
    return ArchiveConfig.from_env(settings, os.environ, prefix=args.prefix, bucket=args.bucket)


def run_verify(args: argparse.Namespace) -> int:
    try:
        settings = command_settings()
        config = command_archive_config(settings, args)
        result = run_command(verify(settings, config))
    except EventStoreError as exc:
        print(f"backbone archive verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        document = {
            "ok": result.ok,
            "bucket": config.bucket,
            "prefix": config.prefix,
            **msgspec.to_builtins(result),
        }
        print(json.dumps(document))
    else:
        print(report(result, config))
    return 0 if result.ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("archive", help="the S3 archive of the log")
    commands = parser.add_subparsers(dest="archive_command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "verify",
        help="recompute every hash chain and name any damaged segment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--json", action="store_true", help="one JSON document on stdout")
    check.add_argument("--prefix", help="key prefix in the bucket (default: the topic prefix)")
    check.add_argument("--bucket", help="bucket (default: backbone-archive)")
    check.set_defaults(func=run_verify)
