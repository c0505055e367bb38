"""``backbone bench recovery`` runs end to end (tiny counts) and writes its figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ops.cli import main
from ops.stack import StackInfo


def test_bench_recovery_archives_and_verifies(stack: StackInfo, tmp_path: Path) -> None:
    out = tmp_path / "recovery.json"
    assert main(["bench", "recovery", "--events", "1000", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    rows = {row["name"].split(" (")[0]: row for row in document["results"]}
    assert rows["archive to S3"]["count"] == 1000
    assert rows["archive verify"]["count"] == 1000
    assert "verify ok=True" in rows["archive verify"]["note"]
