"""``backbone bench``: benchmarks that print a table and write JSON (never timed tests)."""

from __future__ import annotations

import argparse

from ops.bench import fanout, ingest, produce, project, recovery


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("bench", help="run a benchmark against the local stack")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    produce.register(benches)
    fanout.register(benches)
    ingest.register(benches)
    project.register(benches)
    recovery.register(benches)
