"""docs/results.md is rendered from docs/results_records.jsonl, and the README stays a short guide."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200


def load_records() -> list[dict]:
    lines = (DOCS / "results_records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_results_md_is_what_the_records_render() -> None:
    """A hand edit of results.md (or a record added without rerendering) fails here."""
    done = subprocess.run([sys.executable, str(DOCS / "render_results.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_measured_record_has_its_command_machine_and_date() -> None:
    records = load_records()
    assert records
    for record in records:
        label = f"{record.get('table')}: {record.get('method')}"
        assert record.get("metrics"), label
        if record["table"] == "published":  # other papers' figures: a source instead
            assert record.get("source", "").strip(), label
            continue
        for key in ("command", "machine", "date"):
            assert str(record.get(key, "")).strip(), f"{label} has no {key}"


def test_renderer_refuses_a_record_without_a_command() -> None:
    sys.path.insert(0, str(DOCS))
    try:
        import render_results
    finally:
        sys.path.remove(str(DOCS))
    record = {"table": "quality", "method": "m", "metrics": {"R@10": ".1"}, "machine": "x", "date": "2026-01-01"}
    with pytest.raises(ValueError, match="command"):
        render_results.check_record(record, "test")


def test_readme_is_a_short_guide() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    head = "\n".join(text.splitlines()[:20])
    assert "make run" in head and "make test" in head


def test_readme_results_rows_come_from_the_records() -> None:
    """Every row of the README's results table has the four figures of a record for its dataset."""
    known = {
        (r.get("dataset"), tuple(r["metrics"].get(k) for k in ("R@5", "R@10", "N@5", "N@10")))
        for r in load_records()
    }
    section = README.read_text(encoding="utf-8").split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| dataset")]
    assert rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert (cells[0], tuple(cells[2:6])) in known, row
