"""The archiver tier: writes the event topics to S3 as hash-chained segments.

Run it with ``python -m ops.archiver`` (``backbone up`` does); see :mod:`ops.archiver.worker`.
"""

from ops.archiver.worker import Archiver, group_id, run

__all__ = ["Archiver", "group_id", "run"]
