"""`stack_up`, `stack_down`, `stack_status`: the whole local stack as one idempotent unit.

`stack_up` installs what is missing (one apt-get run for the Debian packages; Maven fetches the
Java servers inside their own start), then brings the four parts up concurrently, each reusing
its server when that already runs. Holding the stack lock for the whole run makes two
concurrent `up`s (two test sessions) take turns instead of racing to start the same server.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from ops.stack.errors import StackError
from ops.stack.info import PartStatus, StackInfo
from ops.stack.install import apt_install
from ops.stack.jvm import JAVA_PACKAGE, java_missing
from ops.stack.kafka import KAFKA_BASE_PORT, KafkaCluster
from ops.stack.layout import LOOPBACK, logs_dir
from ops.stack.maven import KAFKA, MAVEN_PACKAGE, S3PROXY, maven_missing
from ops.stack.postgres import Postgres, dsn
from ops.stack.progress import say
from ops.stack.redis import Redis, redis_url
from ops.stack.s3 import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, S3Proxy, endpoint
from ops.stack.state import StateStore, stack_lock

PARTS = ("kafka", "postgres", "redis", "s3")


class Part(Protocol):
    """What the lifecycle needs from each server."""

    name: str

    def packages(self) -> list[str]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> list[PartStatus]: ...


class KafkaPart:
    """Adapts `KafkaCluster` to the `Part` protocol."""

    name = "kafka"

    def __init__(self, cluster: KafkaCluster) -> None:
        self.cluster = cluster

    def packages(self) -> list[str]:
        return []

    def start(self) -> None:
        self.cluster.start()

    def stop(self) -> None:
        self.cluster.stop()

    def status(self) -> list[PartStatus]:
        return self.cluster.status()


def _resolve(data_dir: Path) -> Path:
    return data_dir.expanduser().resolve()


def _brokers(store: StateStore, default: int = 1) -> int:
    return store.load().kafka_brokers or default


def _parts(data_dir: Path, store: StateStore, brokers: int) -> dict[str, Part]:
    parts: list[Part] = [
        KafkaPart(KafkaCluster(data_dir, brokers, base_port=KAFKA_BASE_PORT, store=store)),
        Postgres(data_dir, store),
        Redis(data_dir, store),
        S3Proxy(data_dir, store),
    ]
    return {part.name: part for part in parts}


def _packages(parts: dict[str, Part]) -> list[str]:
    """Debian packages missing for `parts` (Java and Maven only if a jar cache is cold)."""
    needed = [package for part in parts.values() for package in part.packages()]
    needed += [JAVA_PACKAGE] if java_missing() else []
    cold = not (KAFKA.cached() and S3PROXY.cached())
    needed += [MAVEN_PACKAGE] if cold and maven_missing() else []
    return needed


def stack_up(data_dir: Path, *, brokers: int = 1) -> StackInfo:
    """Start every part that does not run (reusing those that do); wait until all are healthy.

    Idempotent and synchronous. Raises StackError naming the part that failed, why, and its log.
    """
    if brokers < 1:
        raise ValueError("brokers must be at least 1")
    data_dir = _resolve(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with stack_lock(data_dir):
        store = StateStore(data_dir)
        parts = _parts(data_dir, store, brokers)
        kafka = parts["kafka"]
        assert isinstance(kafka, KafkaPart)
        # Fail on a cluster-size mismatch before starting anything else.
        kafka.cluster.preflight()
        apt_install(_packages(parts), logs_dir(data_dir) / "install.log")
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            futures = {name: pool.submit(part.start) for name, part in parts.items()}
        errors = [exc for f in futures.values() if (exc := f.exception()) is not None]
        for extra in errors[1:]:
            say(f"also failed: {extra}")
        if errors:
            raise errors[0]
    info = stack_info(data_dir)
    say(f"ready in {time.monotonic() - began:.1f}s ({data_dir})")
    return info


def stack_down(data_dir: Path, *, parts: tuple[str, ...] | None = None) -> None:
    """Stop the servers this stack started (all, or only `parts`); other processes are left.

    Only pids recorded in the state file whose command line names this data dir are signalled.
    """
    data_dir = _resolve(data_dir)
    if not (data_dir / "stack.json").exists():
        return
    with stack_lock(data_dir):
        store = StateStore(data_dir)
        chosen = [
            part
            for name, part in _parts(data_dir, store, _brokers(store)).items()
            if parts is None or name in parts
        ]
        with ThreadPoolExecutor(max_workers=len(PARTS)) as pool:
            futures = [pool.submit(part.stop) for part in chosen]
        for future in futures:
            future.result()
    say(f"stopped {', '.join(part.name for part in chosen)} ({data_dir})")


def stack_status(data_dir: Path) -> list[PartStatus]:
    """Each part (each Kafka node on a multi-broker stack): address, pid, running, log."""
    data_dir = _resolve(data_dir)
    store = StateStore(data_dir)
    return [
        row for part in _parts(data_dir, store, _brokers(store)).values() for row in part.status()
    ]


def stack_info(data_dir: Path) -> StackInfo:
    """The addresses recorded for the stack in `data_dir` (whether or not it runs now)."""
    data_dir = _resolve(data_dir)
    state = StateStore(data_dir).load()
    brokers = state.kafka_brokers or 1

    def port(name: str) -> int:
        record = state.parts.get(name)
        if record is None:
            raise StackError(name, f"no address recorded in {data_dir}; run `backbone stack up`")
        return record.port

    return StackInfo(
        data_dir=data_dir,
        brokers=brokers,
        kafka_bootstrap=",".join(
            f"{LOOPBACK}:{port(f'kafka-{node}')}" for node in range(1, brokers + 1)
        ),
        postgres_dsn=dsn(port("postgres")),
        redis_url=redis_url(port("redis")),
        s3_endpoint=endpoint(port("s3")),
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
        s3_region=S3_REGION,
    )
