"""The bootstrap's choice of interpreter for the project's virtualenv (``ops/bin/python-for-venv``).

The distribution's Python (profile-guided, link-time optimised, statically linked on Debian)
comes before a version manager's ``python3`` on PATH when it can make a virtualenv; ``PYTHON``
overrides both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHOOSER = ROOT / "ops" / "bin" / "python-for-venv"


def chosen(**env: str) -> str:
    """What the chooser prints with ``env`` (and neither variable it reads otherwise set)."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "BACKBONE_SYSTEM_PYTHON")}
    done = subprocess.run(
        [str(CHOOSER)], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def fake_python(path: Path, version: tuple[int, int], *, ensurepip: bool = True) -> Path:
    """An executable that answers the chooser's checks as Python ``version`` would, with or
    without ``ensurepip`` (Debian's python3 lacks it until python3-venv is installed)."""
    missing = "" if ensurepip else 'case "$2" in *ensurepip*) exit 1 ;; esac\n'
    path.write_text(
        "#!/bin/sh\n"
        + missing
        + f'exec {sys.executable} -c "import sys; sys.exit({version!r} < (3, 11))"\n'
    )
    path.chmod(0o755)
    return path


def test_python_names_the_interpreter_whatever_else_there_is(tmp_path: Path) -> None:
    system = fake_python(tmp_path / "python3", (3, 12))
    assert chosen(PYTHON="/opt/python/bin/python3.13", BACKBONE_SYSTEM_PYTHON=str(system)) == (
        "/opt/python/bin/python3.13"
    )


def test_the_distributions_python_comes_first_when_it_is_new_enough(tmp_path: Path) -> None:
    system = fake_python(tmp_path / "python3", (3, 11))
    assert chosen(BACKBONE_SYSTEM_PYTHON=str(system)) == str(system)


def test_an_old_or_missing_distribution_python_leaves_the_one_on_path(tmp_path: Path) -> None:
    old = fake_python(tmp_path / "python3", (3, 9))
    assert chosen(BACKBONE_SYSTEM_PYTHON=str(old)) == "python3"
    assert chosen(BACKBONE_SYSTEM_PYTHON=str(tmp_path / "absent")) == "python3"


def test_a_distribution_python_that_cannot_make_a_virtualenv_leaves_the_one_on_path(
    tmp_path: Path,
) -> None:
    bare = fake_python(tmp_path / "python3", (3, 11), ensurepip=False)
    assert chosen(BACKBONE_SYSTEM_PYTHON=str(bare)) == "python3"


def test_the_bootstrap_makes_its_virtualenv_with_the_chosen_interpreter() -> None:
    bootstrap = (ROOT / "ops" / "bin" / "backbone").read_text()
    assert 'python="$("$root/ops/bin/python-for-venv")"' in bootstrap
    assert '"$python" -m venv "$venv"' in bootstrap
