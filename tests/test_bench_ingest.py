"""``backbone bench ingest`` runs end to end (tiny counts) and writes its figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ops.cli import main
from ops.stack import StackInfo


def test_bench_ingest_writes_every_subject(stack: StackInfo, tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    code = main(
        [
            "bench",
            "ingest",
            "--seconds",
            "1",
            "--raw-events",
            "300",
            "--conversations",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    names = [row["name"] for row in document["results"]]
    assert names[0].startswith("bare aiohttp")
    assert any(n.startswith("ingest x1: max rate") for n in names)
    assert any(n.startswith("ingest x2") for n in names)
    single = next(r for r in document["results"] if r["name"] == "ingest x1: max rate")
    assert single["count"] > 0
    assert "non-2xx" in single["note"]
    assert document["ratio_vs_bare"] > 0
