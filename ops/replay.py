"""``backbone replay --projector chat`` and ``backbone checksum``: rebuild and verify read models.

``replay`` builds a new version of the read model from offset 0 into a shadow schema while the
live projector keeps serving, swaps it in atomically and rebuilds the Redis caches (see
:mod:`projectors.rebuild`; rerun it after a crash and it resumes). It never touches the
fan-out tier: nothing is written to Kafka, so nothing is pushed again. On a terminal it draws a
progress bar on stderr; ``--json`` prints one JSON object per line on stdout instead
(``progress`` lines, then one ``result`` line with the checksum of what was swapped in).

``--from s3`` reads the S3 archive instead of Kafka: the archive the archiver writes, verify
checks and restore-log restores (``BACKBONE_ARCHIVE_BUCKET``, default ``backbone-archive``;
``BACKBONE_ARCHIVE_PREFIX``, default the topic prefix), or ``--archive-bucket`` /
``--archive-prefix``. An archive that holds no record at all is refused (nothing is built or
swapped in): it is a wrong location, not an empty log.
``--until TIME|POSITION`` (an RFC 3339 time with a zone, or a position token) stops every
partition at that point, so the model is the state then (messages after it absent); it
requires ``--into SCHEMA``: the point-in-time model is left in a schema of its own (e.g. for
an audit) and never swapped in, since the live projector would carry a swapped-in past forward
to the log end again. ``--into`` also works without ``--until`` (a model beside the live one).
Rerun with the same options to resume; drop the schema when done
(``DROP SCHEMA <name> CASCADE``).

``checksum`` prints the fingerprint of a read-model schema: equal checksums mean equal tables
(see :mod:`projectors.checksum`), which is how a rebuild, a restore or a second database is
proven equal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Final, TextIO

import msgspec
from redis.asyncio import Redis

from eventstore import EventStore, EventStoreError, Settings, TopicLayout, create_pool
from eventstore.archive import Archive, ArchiveConfig
from eventstore.objects import s3_client
from eventstore.runtime import run_command
from ops.deployment import command_settings
from projectors.checksum import checksum
from projectors.errors import ProjectorError
from projectors.read.contract import LIVE_SCHEMA
from projectors.rebuild import Progress, Rebuild, RebuildResult
from projectors.schema import checked_schema_name, schema_exists
from projectors.sources import (
    REPLAY_BATCH,
    ArchiveSource,
    RecordSource,
    ReplaySourceError,
    Until,
)

PROJECTORS: Final = {"chat": LIVE_SCHEMA}
"""Projector name -> the live schema it owns."""
_BAR_WIDTH: Final = 30
_DRAW_INTERVAL: Final = 0.2
_JSON_INTERVAL: Final = 1.0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(progress: Progress) -> str:
    """One line of the progress bar: bar, records, rate, ETA."""
    total = max(progress.total, 1)
    done = min(progress.applied / total, 1.0)
    filled = int(done * _BAR_WIDTH)
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    return (
        f"{progress.phase:<5} [{bar}] {done:4.0%} {progress.applied:,}/{progress.total:,} events"
        f"  {progress.rate:,.0f}/s  ETA {_duration(progress.eta)}"
    )


class ProgressReporter:
    """Draws :class:`Progress` as a bar on a terminal, as JSON lines, or not at all."""

    def __init__(self, *, as_json: bool, out: TextIO, err: TextIO) -> None:
        self._json = as_json
        self._out = out
        self._err = err
        self._bar = not as_json and err.isatty()
        self._last = 0.0
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        interval = _JSON_INTERVAL if self._json else _DRAW_INTERVAL
        if now - self._last < interval:
            return
        self._last = now
        if self._json:
            document = {"event": "progress", **msgspec.to_builtins(progress)}
            document.update(rate=round(progress.rate, 1), eta=progress.eta)
            print(json.dumps(document), file=self._out, flush=True)
        elif self._bar:
            print(f"\r{progress_line(progress)}", end="", file=self._err, flush=True)
            self._drawn = True

    def finish(self) -> None:
        """End the bar's line, so what follows starts on a line of its own."""
        if self._drawn:
            print(file=self._err, flush=True)
            self._drawn = False


async def replay(
    settings: Settings,
    schema: str,
    *,
    batch: int,
    on_progress: ProgressReporter | None,
    workers: int | None = None,
    source: str = "kafka",
    archive_prefix: str | None = None,
    archive_bucket: str | None = None,
    until: Until | None = None,
    into: str | None = None,
    env: Mapping[str, str] | None = None,
) -> RebuildResult:
    """Rebuild ``schema`` of the deployment ``settings`` names; see :mod:`projectors.rebuild`.

    ``source``: ``kafka`` or ``s3`` (the archive the archiver writes:
    :meth:`~eventstore.archive.ArchiveConfig.from_env`, ``env`` defaulting to the process
    environment, with ``archive_prefix``/``archive_bucket`` over it);
    ``until``/``into``: a point-in-time model / a schema of its own, no swap.
    :class:`ReplaySourceError` when the archive holds no record.
    """
    redis = Redis.from_url(settings.redis_url)
    client = s3_client(settings) if source == "s3" else None
    try:
        async with await EventStore.open(settings, with_producer=False) as store:
            records: RecordSource | None = None
            if client is not None:
                config = ArchiveConfig.from_env(
                    settings,
                    os.environ if env is None else env,
                    prefix=archive_prefix,
                    bucket=archive_bucket,
                )
                archive = Archive(client, config.bucket, config.prefix)
                records = ArchiveSource(archive, TopicLayout.from_settings(settings), batch=batch)
                if not any((await records.ends()).values()):
                    raise ReplaySourceError(
                        f"the archive s3://{config.bucket}/{config.prefix}/ holds no record: "
                        "refusing to build (and swap in) an empty model; check "
                        "BACKBONE_ARCHIVE_BUCKET / BACKBONE_ARCHIVE_PREFIX (or --archive-bucket "
                        "/ --archive-prefix)"
                    )
            rebuild = Rebuild(
                store,
                live=schema,
                redis=redis,
                namespace=settings.topic_prefix,
                batch=batch,
                workers=workers,
                on_progress=on_progress,
                source=records,
                until=until,
                into=into,
            )
            return await rebuild.run()
    finally:
        if client is not None:
            client.close()
        await redis.aclose()


def summary(result: RebuildResult, *, kept: bool = False) -> str:
    rate = result.records / result.seconds if result.seconds > 0 else 0.0
    how = "resumed and applied" if result.resumed else "applied"
    replaced = " (replaced the previous model, now dropped)" if result.replaced else ""
    done = "kept in its own schema" if kept else f"swapped in{replaced}"
    return (
        f"replay {result.schema}: {how} {result.records:,} events in {result.seconds:.1f} s "
        f"({rate:,.0f}/s); {done}\nchecksum {result.checksum}"
    )


def run_replay(args: argparse.Namespace) -> int:
    reporter = ProgressReporter(as_json=args.json, out=sys.stdout, err=sys.stderr)
    try:
        result = run_command(
            replay(
                command_settings(),
                PROJECTORS[args.projector],
                batch=args.batch,
                workers=args.workers,
                on_progress=reporter,
                source=args.source,
                archive_prefix=args.archive_prefix,
                archive_bucket=args.archive_bucket,
                until=args.until,
                into=args.into,
            )
        )
    except (EventStoreError, ProjectorError) as exc:
        reporter.finish()
        print(f"backbone replay: {exc}", file=sys.stderr)
        return 1
    reporter.finish()
    if args.json:
        print(json.dumps({"event": "result", **msgspec.to_builtins(result)}), flush=True)
    else:
        print(summary(result, kept=args.into is not None))
    return 0


async def schema_checksum(settings: Settings, schema: str) -> str:
    """The checksum of ``schema``; :class:`ProjectorError` when there is no such schema."""
    schema = checked_schema_name(schema)
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            if not await schema_exists(conn, schema):
                raise ProjectorError(f"no read model in schema {schema!r}")
            return await checksum(conn, schema)
    finally:
        await pool.close()


def run_checksum(args: argparse.Namespace) -> int:
    try:
        digest = asyncio.run(schema_checksum(command_settings(), args.schema))
    except (EventStoreError, ProjectorError) as exc:
        print(f"backbone checksum: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"schema": args.schema, "checksum": digest}))
    else:
        print(f"{digest}  {args.schema}")
    return 0


def _schema(raw: str) -> str:
    try:
        return checked_schema_name(raw)
    except (ValueError, ProjectorError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw} is not a positive number")
    return value


def _until(raw: str) -> Until:
    try:
        return Until.parse(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is neither an RFC 3339 time with a zone nor a position token"
        ) from exc


def _run_checked(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def run(args: argparse.Namespace) -> int:
        if args.until is not None and args.into is None:
            parser.error("--until needs --into SCHEMA: a point-in-time model is never swapped in")
        if args.source != "s3" and (
            args.archive_prefix is not None or args.archive_bucket is not None
        ):
            parser.error("--archive-prefix and --archive-bucket are for --from s3")
        return run_replay(args)

    parser.set_defaults(func=run)
    return parser


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "replay",
        help="rebuild a read model from the log into a shadow schema and swap it in",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--projector", choices=sorted(PROJECTORS), default="chat")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    parser.add_argument(
        "--batch",
        type=_positive,
        default=REPLAY_BATCH,
        help=f"records per batch (default {REPLAY_BATCH})",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes applying the log in the build passes (default: one per CPU and one more)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        choices=("kafka", "s3"),
        default="kafka",
        help="read the log from Kafka (default) or from the S3 archive",
    )
    parser.add_argument(
        "--archive-prefix",
        help="key prefix of the archive in the bucket (default: BACKBONE_ARCHIVE_PREFIX, else "
        "the topic prefix)",
    )
    parser.add_argument(
        "--archive-bucket",
        help="bucket of the archive (default: BACKBONE_ARCHIVE_BUCKET, else backbone-archive)",
    )
    parser.add_argument(
        "--until",
        type=_until,
        default=None,
        help="stop at this RFC 3339 time or position token (requires --into)",
    )
    parser.add_argument(
        "--into",
        type=_schema,
        default=None,
        help="build into this schema and leave it there, without swapping",
    )
    _run_checked(parser)
    check = sub.add_parser("checksum", help="print the checksum of a read-model schema")
    check.add_argument("--schema", default=LIVE_SCHEMA)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=run_checksum)
