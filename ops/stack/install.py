"""Installing the Debian packages the stack runs (PostgreSQL, Redis, and Maven/Java if absent).

Everything is idempotent: callers ask for packages only when the program they need is missing,
and all of them are installed by one `apt-get update` + `apt-get install` so a fresh machine pays
for the package index once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ops.stack.errors import StackError
from ops.stack.process import run_logged
from ops.stack.progress import say

APT_TIMEOUT = 900.0


def apt_install(packages: Sequence[str], log: Path) -> None:
    """Install `packages` with apt-get (as root, or through sudo), logging to `log`."""
    wanted = sorted(set(packages))
    if not wanted:
        return
    part = "install"
    if shutil.which("apt-get") is None:
        raise StackError(part, f"missing {', '.join(wanted)} and apt-get is not available")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise StackError(
                part, f"missing {', '.join(wanted)}; run: apt-get install -y {' '.join(wanted)}"
            )
        prefix = ["sudo", "-n"]
    say(f"installing {', '.join(wanted)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for a dpkg lock held by another apt run instead of failing at once.
    lock_wait = ["-o", "DPkg::Lock::Timeout=300"]
    steps = [
        [*prefix, "apt-get", *lock_wait, "update", "-q"],
        [*prefix, "apt-get", *lock_wait, "install", "-y", "-q", "--no-install-recommends", *wanted],
    ]
    for argv in steps:
        run_logged(argv, log, part=part, what=f"`{' '.join(argv)}`", timeout=APT_TIMEOUT, env=env)
