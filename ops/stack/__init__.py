"""The local stack: Kafka (KRaft), PostgreSQL, Redis and S3Proxy on loopback, no Docker.

`stack_up(data_dir)` fetches what is missing (apt-get, Maven Central), starts every server under
`data_dir` on ports of its own, waits until each is healthy and returns their addresses; it is
idempotent. `stack_down` stops only what it started, `stack_status` reports each part.
`KafkaCluster` runs a throwaway cluster of its own for fault tests.
"""

from __future__ import annotations

from ops.stack.errors import StackError
from ops.stack.info import PartStatus, StackInfo
from ops.stack.kafka import KafkaCluster
from ops.stack.layout import default_stack_dir
from ops.stack.lifecycle import stack_down, stack_info, stack_status, stack_up

__all__ = [
    "KafkaCluster",
    "PartStatus",
    "StackError",
    "StackInfo",
    "default_stack_dir",
    "stack_down",
    "stack_info",
    "stack_status",
    "stack_up",
]
