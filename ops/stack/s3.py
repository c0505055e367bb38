"""An S3 server: S3Proxy from Maven Central on its filesystem backend.

S3Proxy 4 no longer embeds Apache jclouds; its filesystem store is called `filesystem-nio2`
(the old `jclouds.*` property names are still how it is configured). Objects are plain files
under `<data_dir>/s3/data/<bucket>/`. Clients must use path-style addressing: the endpoint is an
IP address, so virtual-host style bucket names cannot resolve.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path

from ops.stack import maven
from ops.stack.errors import StackError
from ops.stack.health import Target, wait_healthy
from ops.stack.info import PartStatus
from ops.stack.jvm import java_path, marker_option
from ops.stack.layout import LOOPBACK, log_file
from ops.stack.ports import choose_port
from ops.stack.process import is_ours, rotate_log, spawn_detached
from ops.stack.progress import say
from ops.stack.recorded import recorded_status, stop_recorded
from ops.stack.state import ProcessRecord, StateStore

PART = "s3"
S3_PORT = 39080
S3_ACCESS_KEY = "backbone"
S3_SECRET_KEY = "backbone-local-secret"  # noqa: S105 - loopback-only dev server
S3_REGION = "us-east-1"
BUCKETS = ("backbone-media", "backbone-archive", "backbone-exports")
START_TIMEOUT = 60.0


def endpoint(port: int) -> str:
    return f"http://{LOOPBACK}:{port}"


def answers_http(port: int) -> bool:
    """Whether an HTTP server answers on `port` (S3Proxy answers an anonymous GET with 403)."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


def ensure_buckets(port: int, log: Path) -> list[str]:
    """Create the project's buckets that do not exist yet; return the ones created."""
    import boto3  # imported here: boto3 takes a while to import and only this step needs it
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint(port),
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name=S3_REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )
    created = []
    try:
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
                created.append(bucket)
    except (BotoCoreError, ClientError) as exc:
        raise StackError(PART, f"creating buckets failed: {exc}", log) from exc
    finally:
        client.close()
    return created


class S3Proxy:
    """The stack's S3 server."""

    name = PART

    def __init__(self, data_dir: Path, store: StateStore) -> None:
        self.data_dir = data_dir
        self.store = store
        self.home = data_dir / "s3"
        self.config = self.home / "s3proxy.conf"
        self.log = log_file(data_dir, PART)

    def packages(self) -> list[str]:
        return []

    def start(self) -> None:
        """Reuse the running server or start it; then make sure the buckets exist."""
        began = time.monotonic()
        with self.store.edit() as state:
            record = state.parts.get(PART)
            reused_pid: int | None = None
            if record is not None and is_ours(record.pid, self.config):
                reused_pid, port = record.pid, record.port
            else:
                port = choose_port(record.port if record else None, S3_PORT, set())
                state.parts[PART] = ProcessRecord(port=port)
        if reused_pid is not None:
            pid = reused_pid
        else:
            jar = self._jar()
            self.home.mkdir(parents=True, exist_ok=True)
            (self.home / "data").mkdir(exist_ok=True)
            self.config.write_text(self._properties(port))
            rotate_log(self.log)
            argv = [
                java_path(PART),
                "-Xms64m",
                "-Xmx256m",
                "-XX:+ExitOnOutOfMemoryError",
                # Logback prints its own configuration status on every start; keep the log
                # about S3 requests.
                "-Dlogback.statusListenerClass=ch.qos.logback.core.status.NopStatusListener",
                marker_option(self.data_dir),
                "-jar",
                str(jar),
                "--properties",
                str(self.config),
            ]
            pid = spawn_detached(argv, self.log)
            with self.store.edit() as state:
                state.parts[PART].pid = pid
        wait_healthy(
            [Target(PART, pid, lambda: answers_http(port), self.log)], timeout=START_TIMEOUT
        )
        created = ensure_buckets(port, self.log)
        suffix = f", created buckets {', '.join(created)}" if created else ""
        if reused_pid is not None:
            say(f"s3 running on {endpoint(port)} (reused{suffix})")
        else:
            say(f"s3 started on {endpoint(port)} ({time.monotonic() - began:.1f}s{suffix})")

    def stop(self) -> None:
        """SIGTERM the server we started."""
        stop_recorded(self.store, PART, lambda _record: self.config)

    def status(self) -> list[PartStatus]:
        return recorded_status(self.store, PART, lambda _record: self.config, self.log)

    @staticmethod
    def _jar() -> Path:
        lib = maven.fetch(maven.S3PROXY)
        jars = sorted(lib.glob("s3proxy-*-jar-with-dependencies.jar"))
        if not jars:
            raise StackError(PART, f"no S3Proxy jar in {lib}")
        return jars[-1]

    def _properties(self, port: int) -> str:
        return (
            "# Generated by backbone's local stack on every start; edits are overwritten.\n"
            f"s3proxy.endpoint={endpoint(port)}\n"
            "s3proxy.authorization=aws-v2-or-v4\n"
            f"s3proxy.identity={S3_ACCESS_KEY}\n"
            f"s3proxy.credential={S3_SECRET_KEY}\n"
            "jclouds.provider=filesystem-nio2\n"
            f"jclouds.filesystem.basedir={self.home / 'data'}\n"
        )
