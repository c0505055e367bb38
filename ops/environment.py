"""The environment the project's processes get on a local stack.

The stack knows where its servers listen (:meth:`StackInfo.env`); this module adds what the
stack does not own: the master key that wraps personal-data keys. On a local stack it lives
in ``<stack dir>/master.key`` (mode 0600, made once); a ``BACKBONE_MASTER_KEY`` already in the
environment wins, as it must in production where the key comes from a secret store.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path

from eventstore import Settings, load_settings
from ingest.auth.tokens import local_jwt_keys
from ops.stack import StackInfo

MASTER_KEY_FILE = "master.key"


def local_master_key(data_dir: Path) -> str:
    """The stack's master key as ``id:base64``, created on first use."""
    path = data_dir / MASTER_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        key = "local1:" + base64.b64encode(os.urandom(32)).decode()
        # Create with 0600 from the start: the key must never be readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
    return path.read_text().strip()


def stack_env(info: StackInfo, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus everything pointing at the stack."""
    env = dict(os.environ if base is None else base)
    env.update(info.env())
    if not env.get("BACKBONE_MASTER_KEY"):
        env["BACKBONE_MASTER_KEY"] = local_master_key(info.data_dir)
    if not env.get("BACKBONE_JWT_KEYS"):
        env["BACKBONE_JWT_KEYS"] = local_jwt_keys(info.data_dir)
    return env


def stack_settings(info: StackInfo) -> Settings:
    return load_settings(stack_env(info))
