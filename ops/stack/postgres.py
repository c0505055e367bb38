"""PostgreSQL from Debian's packages, in a data directory of the stack's own.

The cluster is created once with `initdb`, then the `backbone` role (with CREATEDB, so tests can
make throwaway databases) and database are created in single-user mode before the server ever
listens: no superuser password or socket is needed, and the server only accepts password (SCRAM)
logins over loopback TCP. Unix sockets are disabled: their path length is limited and the
default socket directory belongs to the system cluster.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to, and the server
runs as, the `postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ops.stack.errors import StackError
from ops.stack.health import Target, wait_healthy
from ops.stack.info import PartStatus
from ops.stack.layout import LOOPBACK, log_file
from ops.stack.ports import choose_port
from ops.stack.process import is_ours, privilege_drop, rotate_log, spawn_detached
from ops.stack.progress import say
from ops.stack.recorded import recorded_status, stop_recorded
from ops.stack.state import ProcessRecord, StateStore

PART = "postgres"
PACKAGE = "postgresql"
SERVICE_USER = "postgres"
PG_PORT = 39432
PG_USER = "backbone"
PG_PASSWORD = "backbone"  # noqa: S105 - loopback-only development database
PG_DATABASE = "backbone"
START_TIMEOUT = 60.0
INIT_TIMEOUT = 180.0
BOOTSTRAPPED_MARKER = "bootstrapped"


def find_bindir() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else `postgres` on PATH."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.parent.name))

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=version)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def dsn(port: int) -> str:
    """The connection string of the stack's `backbone` database."""
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{LOOPBACK}:{port}/{PG_DATABASE}"


@dataclass(frozen=True)
class ServiceAccount:
    """The OS user the cluster belongs to (None: the current user, when we are not root)."""

    name: str | None
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def for_current_user(cls) -> ServiceAccount:
        if os.geteuid() != 0:
            return cls(None, os.geteuid(), os.getegid(), frozenset(os.getgroups()))
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError as exc:
            raise StackError(
                PART,
                f"running as root needs the `{SERVICE_USER}` system user (package "
                f"{PACKAGE} creates it)",
            ) from exc
        groups = frozenset(os.getgrouplist(SERVICE_USER, entry.pw_gid))
        return cls(SERVICE_USER, entry.pw_uid, entry.pw_gid, groups)

    def can_traverse(self, directory: Path) -> bool:
        """Whether this user may pass through `directory` (execute permission)."""
        info = directory.stat()
        if info.st_uid == self.uid:
            return bool(info.st_mode & stat.S_IXUSR)
        if info.st_gid in self.groups:
            return bool(info.st_mode & stat.S_IXGRP)
        return bool(info.st_mode & stat.S_IXOTH)

    def chown_tree(self, root: Path) -> None:
        if self.name is None:
            return
        os.chown(root, self.uid, self.gid)
        for parent, dirs, files in os.walk(root):
            for entry in (*dirs, *files):
                os.chown(os.path.join(parent, entry), self.uid, self.gid, follow_symlinks=False)


class Postgres:
    """The stack's PostgreSQL server."""

    name = PART

    def __init__(self, data_dir: Path, store: StateStore) -> None:
        self.data_dir = data_dir
        self.store = store
        self.log = log_file(data_dir, PART)

    # -- places ------------------------------------------------------------------------------

    @property
    def default_home(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def fallback_home(self) -> Path:
        """Where the cluster lives when the `postgres` user cannot reach the stack's data dir.

        A checkout under a private directory (a 0700 home, pytest's temp root) is not traversable
        by the `postgres` user, and loosening permissions on someone's home is not our call; so
        the cluster then lives under /var/tmp, in a directory named after the data dir, and the
        state file records where.
        """
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        # /var/tmp rather than /tmp: it survives reboots, like the data it stands in for.
        # _choose_home() refuses a directory there that someone else prepared.
        return Path("/var/tmp") / f"backbone-stack-{digest}" / "postgres"  # noqa: S108

    def home(self) -> Path:
        record = self.store.load().parts.get(PART)
        return Path(record.home) if record and record.home else self.default_home

    def pgdata(self, home: Path | None = None) -> Path:
        return (home or self.home()) / "data"

    # -- lifecycle ---------------------------------------------------------------------------

    def packages(self) -> list[str]:
        """Debian packages to install before this part can start."""
        return [PACKAGE] if find_bindir() is None else []

    def start(self) -> None:
        """Reuse the running server or start it (creating the cluster on first use)."""
        began = time.monotonic()
        bindir = find_bindir()
        if bindir is None:
            raise StackError(PART, f"PostgreSQL is not installed (package {PACKAGE})")
        account = ServiceAccount.for_current_user()
        with self.store.edit() as state:
            record = state.parts.get(PART)
            reused_pid: int | None = None
            if record is not None and record.pid is not None:
                home = Path(record.home) if record.home else self.default_home
                if is_ours(record.pid, self.pgdata(home)):
                    reused_pid, port = record.pid, record.port
            if reused_pid is None:
                home = self._choose_home(account, record)
                port = choose_port(record.port if record else None, PG_PORT, set())
                state.parts[PART] = ProcessRecord(
                    port=port, home=None if home == self.default_home else str(home)
                )
        if reused_pid is not None:
            self._wait(reused_pid, port)
            say(f"postgres running on {LOOPBACK}:{port} (reused)")
            return
        rotate_log(self.log)
        self._ensure_cluster(bindir, account, home)
        pgdata = self.pgdata(home)
        self._write_settings(pgdata, port)
        pid = spawn_detached(
            [*privilege_drop(account.name), str(bindir / "postgres"), "-D", str(pgdata)], self.log
        )
        with self.store.edit() as state:
            state.parts[PART].pid = pid
        self._wait(pid, port)
        say(f"postgres started on {LOOPBACK}:{port} ({time.monotonic() - began:.1f}s)")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint) of the server we started."""
        stop_recorded(self.store, PART, self._pgdata_of, sig=signal.SIGINT)

    def status(self) -> list[PartStatus]:
        return recorded_status(self.store, PART, self._pgdata_of, self.log)

    def _pgdata_of(self, record: ProcessRecord | None) -> Path:
        """The data directory a recorded server runs on (its home may be the fallback)."""
        home = Path(record.home) if record and record.home else self.default_home
        return self.pgdata(home)

    # -- internals ---------------------------------------------------------------------------

    def _choose_home(self, account: ServiceAccount, record: ProcessRecord | None) -> Path:
        if record is not None and record.home:
            return Path(record.home)
        if account.name is None or all(
            account.can_traverse(directory) for directory in [self.data_dir, *self.data_dir.parents]
        ):
            return self.default_home
        fallback = self.fallback_home
        say(f"postgres: {account.name} cannot reach {self.data_dir}; using {fallback}")
        # /var/tmp is world-writable: only use a directory we created ourselves.
        fallback.parent.mkdir(mode=0o755, exist_ok=True)
        info = fallback.parent.lstat()
        if (
            stat.S_ISLNK(info.st_mode)
            or info.st_uid != os.geteuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            raise StackError(PART, f"{fallback.parent} exists and is not ours alone; remove it")
        if record is None and fallback.exists():
            # Left behind by an earlier stack at this path whose state is gone: start afresh,
            # as the data dir itself would.
            shutil.rmtree(fallback)
        return fallback

    def _ensure_cluster(self, bindir: Path, account: ServiceAccount, home: Path) -> None:
        """initdb and create the role and database, unless a previous run completed that."""
        if (home / BOOTSTRAPPED_MARKER).is_file():
            return
        # No marker means no run ever completed the setup, so there is no data to keep.
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        account.chown_tree(home)
        drop = privilege_drop(account.name)
        pgdata = self.pgdata(home)
        self._run(
            [
                *drop,
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "--encoding=UTF8",
                "--no-locale",
                "--data-checksums",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
            ],
            home,
            "initdb failed",
        )
        (pgdata / "pg_hba.conf").write_text(
            "# Generated by backbone's local stack: password logins over loopback TCP only.\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# backbone's local stack settings (rewritten on every start)\n"
                "include = 'backbone.conf'\n"
            )
        self._write_settings(pgdata, PG_PORT)
        bootstrap = (
            f"CREATE ROLE {PG_USER} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}';\n"
            f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER};\n"
        )
        output = self._run(
            [*drop, str(bindir / "postgres"), "--single", "-D", str(pgdata), "postgres"],
            home,
            "creating the backbone role and database failed",
            stdin=bootstrap,
        )
        if "ERROR" in output or "FATAL" in output:
            raise StackError(PART, "creating the backbone role and database failed", self.log)
        account.chown_tree(home)
        (home / BOOTSTRAPPED_MARKER).write_text("initdb and role/database creation completed\n")

    def _run(self, argv: list[str], cwd: Path, failure: str, stdin: str | None = None) -> str:
        try:
            result = subprocess.run(
                argv,
                cwd=cwd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=INIT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(PART, f"{failure}: timed out", self.log) from exc
        output = result.stdout + result.stderr
        with self.log.open("a") as log:
            log.write(f"=== {' '.join(argv)}\n{output}")
        if result.returncode != 0:
            raise StackError(PART, f"{failure} (code {result.returncode})", self.log)
        return output

    @staticmethod
    def _write_settings(pgdata: Path, port: int) -> None:
        settings = pgdata / "backbone.conf"
        settings.write_text(
            "# Generated by backbone's local stack on every start; edits are overwritten.\n"
            f"listen_addresses = '{LOOPBACK}'\n"
            f"port = {port}\n"
            "unix_socket_directories = ''\n"
            "max_connections = 200\n"
            # A rebuild writes the whole read model; with the default 128 MB of buffers and
            # 1 GB of WAL between checkpoints, a million-event replay spent its time evicting
            # dirty pages and checkpointing. Still small beside this machine's memory.
            "shared_buffers = '1GB'\n"
            "max_wal_size = '8GB'\n"
            "checkpoint_timeout = '15min'\n"
            # Durability is under test here: keep PostgreSQL's crash guarantees on.
            "fsync = on\n"
            "synchronous_commit = on\n"
            "full_page_writes = on\n"
            # Commit times let a benchmark read when each row became visible after the fact,
            # instead of polling for it (which loaded the machine it was measuring).
            "track_commit_timestamp = on\n"
            "timezone = 'UTC'\n"
            "log_timezone = 'UTC'\n"
            "log_line_prefix = '%m [%p] %q%u@%d '\n"
        )
        settings.chmod(0o644)

    def _wait(self, pid: int, port: int) -> None:
        bindir = find_bindir()
        assert bindir is not None, "checked before starting"
        pg_isready = str(bindir / "pg_isready")

        def ready() -> bool:
            argv = [
                pg_isready,
                "-q",
                "-h",
                LOOPBACK,
                "-p",
                str(port),
                "-t",
                "1",
                "-U",
                PG_USER,
                "-d",
                PG_DATABASE,
            ]
            return subprocess.run(argv, check=False, timeout=10).returncode == 0

        wait_healthy([Target(PART, pid, ready, self.log)], timeout=START_TIMEOUT)
