"""Finding Java and the JVM options shared by the Java servers (Kafka, S3Proxy)."""

from __future__ import annotations

import os
from pathlib import Path

from ops.stack.errors import StackError
from ops.stack.process import executable

JAVA_PACKAGE = "openjdk-17-jre-headless"


def java_path(part: str) -> str:
    """`$JAVA_HOME/bin/java` when set, else `java` from PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if not os.access(candidate, os.X_OK):
            raise StackError(part, f"JAVA_HOME is set to {home} but {candidate} is not executable")
        return str(candidate)
    return executable(part, "java")


def java_missing() -> bool:
    """Whether no Java runtime can be found (the installer then adds one)."""
    try:
        java_path("java")
    except StackError:
        return True
    return False


def marker_option(data_dir: Path) -> str:
    """A system property naming the stack's data dir: `/proc/PID/cmdline` shows whose JVM it is."""
    return f"-Dbackbone.stack={data_dir}"
