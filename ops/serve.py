"""``backbone serve TIER`` and ``backbone provision``: what a container (or a user) runs.

``serve`` runs one tier in the foreground exactly as ``backbone up`` supervises it
(``python -m <tier>``); ``provision`` applies migrations and creates topics against whatever
``BACKBONE_*`` environment it is given (compose runs it once before the tiers).
"""

from __future__ import annotations

import argparse
import asyncio
import runpy
import sys

from eventstore import EventStoreError, load_settings
from ops.provision import provision
from ops.supervisor import Tier

TIERS = ("ingest", "projectors", "fanout")


def run_serve(args: argparse.Namespace) -> int:
    tier = Tier(args.tier, args.tier)
    if not tier.available():
        print(f"backbone serve: the {args.tier} tier is not built yet", file=sys.stderr)
        return 2
    sys.argv = [args.tier, *args.tier_args]
    runpy.run_module(f"{args.tier}.__main__", run_name="__main__", alter_sys=True)
    return 0


def run_provision(args: argparse.Namespace) -> int:
    try:
        applied, created = asyncio.run(provision(load_settings()))
    except EventStoreError as exc:
        print(f"backbone provision: {exc}", file=sys.stderr)
        return 1
    print(f"provision: {len(applied)} migrations applied, topics created: {created or 'none'}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run one tier in the foreground", description=__doc__)
    serve.add_argument("tier", choices=TIERS)
    serve.add_argument("tier_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=run_serve)
    prov = sub.add_parser("provision", help="apply migrations and create topics")
    prov.set_defaults(func=run_provision)
