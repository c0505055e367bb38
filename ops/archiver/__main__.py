"""``python -m ops.archiver``: run one archiver worker with the ``BACKBONE_*`` environment."""

from __future__ import annotations

import os
import sys

from eventstore import EventStoreError, load_settings
from eventstore.archive import ArchiveConfig
from eventstore.runtime import configure_logging, log_failure
from eventstore.runtime import run as run_loop
from ops.archiver.worker import run


def main() -> int:
    configure_logging()
    try:
        settings = load_settings()
        config = ArchiveConfig.from_env(settings, os.environ)
    except EventStoreError as exc:
        log_failure("archiver", exc)
        return 2
    try:
        # Throughput is all an archiver is for: it collects garbage as a bulk worker does.
        run_loop(run(settings, config), bulk=True)
    except EventStoreError as exc:
        log_failure("archiver", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
