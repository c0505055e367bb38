"""``python -m projectors``: run one projector worker with the ``BACKBONE_*`` environment."""

from __future__ import annotations

import sys

from eventstore import EventStoreError, load_settings
from eventstore.runtime import configure_logging, log_failure, run
from projectors import worker


def main() -> int:
    configure_logging()
    try:
        settings = load_settings()
    except EventStoreError as exc:
        log_failure("projectors", exc)
        return 2
    try:
        run(worker.run(settings))
    except EventStoreError as exc:
        log_failure("projectors", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
