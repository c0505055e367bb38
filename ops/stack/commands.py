"""`backbone stack up|down|status|env`: the local stack from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ops.stack.errors import StackError
from ops.stack.info import StackInfo
from ops.stack.layout import default_stack_dir
from ops.stack.lifecycle import stack_down, stack_info, stack_status, stack_up


def post_up(info: StackInfo) -> None:
    """Hook run by `backbone stack up` once every server is healthy: migrations and topics.

    Provisioning needs the event store, which `ops.stack` itself must not depend on (fault tests
    and the benchmark use the stack alone), hence the import at call time.
    """
    from ops.provision import post_up as provision

    provision(info)


def _data_dir(args: argparse.Namespace) -> Path:
    chosen: Path | None = args.dir
    return chosen if chosen is not None else default_stack_dir()


def cmd_up(args: argparse.Namespace) -> int:
    try:
        info = stack_up(_data_dir(args), brokers=args.brokers)
        post_up(info)
    except StackError as exc:
        print(f"backbone stack up: {exc}", file=sys.stderr)
        return 1
    for row in stack_status(info.data_dir):
        print(f"{row.name:<10} {row.address:<22} pid {row.pid}")
    print(f'environment: eval "$(backbone stack env --dir {shlex.quote(str(info.data_dir))})"')
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        stack_down(_data_dir(args))
    except StackError as exc:
        print(f"backbone stack down: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = stack_status(_data_dir(args))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "address": r.address,
                        "running": r.running,
                        "pid": r.pid,
                        "log": str(r.log),
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
    else:
        print(f"{'PART':<10} {'ADDRESS':<22} {'STATE':<5} {'PID':>7}  LOG")
        for r in rows:
            state = "up" if r.running else "down"
            print(f"{r.name:<10} {r.address:<22} {state:<5} {r.pid or '-':>7}  {r.log}")
    return 0 if all(r.running for r in rows) else 1


def cmd_env(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    try:
        info = stack_info(data_dir)
    except StackError as exc:
        print(f"backbone stack env: {exc}", file=sys.stderr)
        return 1
    down = [r.name for r in stack_status(data_dir) if not r.running]
    if down:
        print(f"backbone stack env: warning: not running: {', '.join(down)}", file=sys.stderr)
    # The master key is not the stack's server configuration but the project needs it too;
    # imported here so that ops.stack itself does not depend on the event store.
    from ops.environment import stack_env

    env = stack_env(info, base={})
    for key, value in sorted(env.items()):
        print(f"export {key}={shlex.quote(value)}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `stack` and its subcommands to the `backbone` command line."""
    stack = subparsers.add_parser(
        "stack",
        help="run the local stack (Kafka, PostgreSQL, Redis, S3) without Docker",
        description=(
            "The local stack: every server on loopback ports of its own, data under one "
            "directory ($BACKBONE_STACK_DIR or .stack/ in the checkout)."
        ),
    )
    commands = stack.add_subparsers(dest="stack_command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "--dir",
            type=Path,
            default=None,
            metavar="PATH",
            help="the stack's data directory (default: $BACKBONE_STACK_DIR or <repo>/.stack)",
        )
        return parser

    up = add("up", "start what is not running, wait until healthy, provision topics and schemas")
    up.add_argument("--brokers", type=int, default=1, help="Kafka nodes (1, or 3 for fault tests)")
    up.set_defaults(func=cmd_up)
    add("down", "stop the servers this stack started").set_defaults(func=cmd_down)
    status = add("status", "show each part, its address and whether it runs (exit 1 if not all)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    add("env", "print `export BACKBONE_...=...` lines pointing at the stack").set_defaults(
        func=cmd_env
    )
