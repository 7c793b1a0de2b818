"""The result files of a run: JSON, CSV and the HTML report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from app.cli.bench.html import render
from app.cli.bench.output import CSV_COLUMNS, as_json, clean, csv_rows
from app.cli.bench.runner import BenchResult


def write_files(result: BenchResult, out_dir: Path) -> list[Path]:
    """Write ``results.json``, ``summary.csv`` and ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "summary.csv", out_dir / "report.html"]
    paths[0].write_text(json.dumps(clean(as_json(result)), indent=1, allow_nan=False) + "\n")
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(result))
    paths[2].write_text(render(result), encoding="utf-8")
    return paths
