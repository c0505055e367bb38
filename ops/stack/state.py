"""The stack's memory: `<data_dir>/stack.json`, and the locks that keep it consistent.

The state file records, per server, the port it was given and the pid it runs as, plus the Kafka
cluster id and broker count. It is what lets a second `stack up` reuse running servers, `down`
stop only what this stack started, and other processes (tests, the CLI) find the addresses.

Writers are the part starters running in threads of one `stack up`, and occasionally another
process (a fault test restarting a broker), so every change is a read-modify-write under a
thread lock plus an `flock`, and the file is replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ops.stack.errors import StackError
from ops.stack.layout import STATE_FILE

STATE_VERSION = 1


@dataclass
class ProcessRecord:
    """One server process: its port and, while this stack runs it, its pid."""

    port: int
    pid: int | None = None
    # Kafka nodes also listen for the KRaft controller protocol.
    controller_port: int | None = None
    # Where the server keeps its data when that is not the default place under the data dir
    # (PostgreSQL falls back outside the checkout when its user cannot reach the data dir).
    home: str | None = None

    @classmethod
    def from_json(cls, raw: Any) -> ProcessRecord:
        if not isinstance(raw, dict) or not isinstance(raw.get("port"), int):
            raise ValueError(f"bad process record {raw!r}")
        pid, controller, home = raw.get("pid"), raw.get("controller_port"), raw.get("home")
        return cls(
            port=raw["port"],
            pid=pid if isinstance(pid, int) else None,
            controller_port=controller if isinstance(controller, int) else None,
            home=home if isinstance(home, str) else None,
        )


@dataclass
class StackState:
    """Everything `stack.json` holds."""

    parts: dict[str, ProcessRecord] = field(default_factory=dict)
    kafka_cluster_id: str | None = None
    kafka_brokers: int | None = None

    @classmethod
    def from_json(cls, raw: Any) -> StackState:
        if not isinstance(raw, dict) or not isinstance(raw.get("parts", {}), dict):
            raise ValueError("not a stack state object")
        cluster_id, brokers = raw.get("kafka_cluster_id"), raw.get("kafka_brokers")
        return cls(
            parts={str(name): ProcessRecord.from_json(rec) for name, rec in raw["parts"].items()},
            kafka_cluster_id=cluster_id if isinstance(cluster_id, str) else None,
            kafka_brokers=brokers if isinstance(brokers, int) else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kafka_cluster_id": self.kafka_cluster_id,
            "kafka_brokers": self.kafka_brokers,
            "parts": {name: asdict(rec) for name, rec in sorted(self.parts.items())},
        }


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class StateStore:
    """Reads and updates the state file of one data directory.

    Share one instance between the threads of a process: its thread lock is what serialises
    them (an `flock` alone would not, two descriptors in one process are independent locks).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / STATE_FILE
        self._lock_path = data_dir / f"{STATE_FILE}.lock"
        self._thread_lock = threading.Lock()

    def load(self) -> StackState:
        """The current state (empty if the stack never ran here)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return StackState()
        try:
            return StackState.from_json(json.loads(text))
        except ValueError as exc:
            raise StackError(
                "stack",
                f"state file {self.path} is corrupt ({exc}); stop the servers and delete it",
            ) from exc

    @contextmanager
    def edit(self) -> Iterator[StackState]:
        """Load the state, let the block change it, and write it back atomically."""
        with self._thread_lock, file_lock(self._lock_path):
            state = self.load()
            yield state
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
            tmp.replace(self.path)


@contextmanager
def stack_lock(data_dir: Path) -> Iterator[None]:
    """Serialise whole `up`/`down` runs on one data directory across processes.

    Two test sessions starting at once would otherwise both find a server missing and both
    start it on the same data.
    """
    with file_lock(data_dir / "stack.lock"):
        yield
