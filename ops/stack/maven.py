"""Fetching the Java servers (Kafka, S3Proxy) from Maven Central into the stack's cache.

Each bundle is resolved once per version by Maven itself (a pom shipped with this package plus
`dependency:copy-dependencies`) into `<cache>/maven/<bundle>-<version>/lib/`, and marked complete
only after the copy finished, so an interrupted download is redone instead of trusted. Warm runs
never start Maven at all.
"""

from __future__ import annotations

import importlib.resources
import shutil
from dataclasses import dataclass
from pathlib import Path

from ops.stack.errors import StackError
from ops.stack.layout import cache_dir
from ops.stack.process import run_logged
from ops.stack.progress import say
from ops.stack.state import file_lock

# Pinned so every machine runs the same servers; bump deliberately (latest releases on Maven
# Central when this was written). log4j must match the log4j-core that kafka_2.13 depends on.
KAFKA_VERSION = "4.4.0"
LOG4J_VERSION = "2.25.5"
S3PROXY_VERSION = "4.1.0"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
MAVEN_PACKAGE = "maven"
MVN_TIMEOUT = 900.0
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class Bundle:
    """A set of jars resolved from one pom."""

    part: str
    name: str
    version: str
    pom: str
    properties: tuple[tuple[str, str], ...]

    @property
    def home(self) -> Path:
        return cache_dir() / "maven" / f"{self.name}-{self.version}"

    @property
    def lib(self) -> Path:
        return self.home / "lib"

    def cached(self) -> bool:
        return (self.home / COMPLETE_MARKER).is_file()


KAFKA = Bundle(
    part="kafka",
    name="kafka",
    version=KAFKA_VERSION,
    pom="kafka.pom.xml",
    properties=(
        ("kafka.version", KAFKA_VERSION),
        ("log4j.version", LOG4J_VERSION),
        ("dependency.plugin.version", DEPENDENCY_PLUGIN_VERSION),
    ),
)

# Kafka's command-line tools (ProducerPerformance for `backbone bench produce`).
KAFKA_TOOLS = Bundle(
    part="kafka-tools",
    name="kafka-tools",
    version=KAFKA_VERSION,
    pom="kafka-tools.pom.xml",
    properties=KAFKA.properties,
)

S3PROXY = Bundle(
    part="s3",
    name="s3proxy",
    version=S3PROXY_VERSION,
    pom="s3proxy.pom.xml",
    properties=(
        ("s3proxy.version", S3PROXY_VERSION),
        ("dependency.plugin.version", DEPENDENCY_PLUGIN_VERSION),
    ),
)


def maven_missing() -> bool:
    """Whether `mvn` is absent (the installer then adds Debian's maven package)."""
    return shutil.which("mvn") is None


def fetch(bundle: Bundle) -> Path:
    """The directory holding `bundle`'s jars, resolving them with Maven if the cache lacks them."""
    if bundle.cached():
        return bundle.lib
    root = bundle.home.parent
    # One Maven at a time: Maven 3.8 does not lock its local repository, and two runs fetching
    # the same plugin jars concurrently can corrupt them.
    with file_lock(root / ".mvn.lock"):
        if bundle.cached():
            return bundle.lib
        _resolve(bundle)
    return bundle.lib


def _resolve(bundle: Bundle) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(bundle.part, "Maven (`mvn`) is needed to fetch jars but is not on PATH")
    home = bundle.home
    if home.exists():
        shutil.rmtree(home)  # an earlier, interrupted attempt
    home.mkdir(parents=True)
    pom = home / "pom.xml"
    pom.write_text(importlib.resources.files("ops.stack").joinpath(bundle.pom).read_text())
    staging = home / "lib.partial"
    log = home / "mvn.log"
    argv = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(pom),
        *(f"-D{key}={value}" for key, value in bundle.properties),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    say(f"{bundle.part}: fetching {bundle.name} {bundle.version} from Maven Central")
    run_logged(
        argv, log, part=bundle.part, what="Maven (fetching jars)", timeout=MVN_TIMEOUT, cwd=home
    )
    if not any(staging.glob("*.jar")):
        raise StackError(bundle.part, f"Maven could not fetch {bundle.name} {bundle.version}", log)
    staging.rename(bundle.lib)
    (home / COMPLETE_MARKER).write_text(f"{bundle.name} {bundle.version}\n")
