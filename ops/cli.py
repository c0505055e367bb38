"""The `backbone` command line: one entry point for operators and developers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from ops import (
        archive_cli,
        backup,
        bench,
        caches_cli,
        dlq,
        privacy,
        replay,
        serve,
        status,
        testing,
        up,
    )
    from ops.restore_log import register as register_restore_log
    from ops.stack.commands import register as register_stack

    parser = argparse.ArgumentParser(prog="backbone", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up.register(sub)
    register_stack(sub)
    serve.register(sub)
    bench.register(sub)
    replay.register(sub)
    dlq.register(sub)
    caches_cli.register(sub)
    status.register(sub)
    privacy.register(sub)
    backup.register(sub)
    testing.register(sub)
    archive_cli.register(sub)
    register_restore_log(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
