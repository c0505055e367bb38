"""``backbone test``: the whole check, exactly as CI runs it.

Lint (ruff), format check, types (mypy, strict on the packages), then the test suite against
the real local stack (pytest starts or reuses it). Every step runs even if an earlier one
failed, so one run reports everything; pytest runs last so its summary line ends the output.
The exit status is non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from ops.stack.layout import repo_root


def run_checks(pytest_args: list[str]) -> int:
    root = repo_root()
    python = sys.executable
    steps = [
        ("ruff check", [python, "-m", "ruff", "check", "."]),
        ("ruff format", [python, "-m", "ruff", "format", "--check", "."]),
        ("mypy", [python, "-m", "mypy"]),
    ]
    failed: list[str] = []
    for name, argv in steps:
        print(f"== {name}", flush=True)
        if subprocess.run(argv, cwd=root, check=False).returncode != 0:
            failed.append(name)
    print("== pytest", flush=True)
    pytest = subprocess.run([python, "-m", "pytest", *pytest_args], cwd=root, check=False)
    if failed:
        print(f"backbone test: failed checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return pytest.returncode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "test",
        help="lint, type-check and run the whole test suite on the real local stack",
        description=__doc__,
    )
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest")
    parser.set_defaults(func=lambda args: run_checks(list(args.pytest_args)))
