"""Run ``sluice bench`` as ``python -m app.cli.bench``."""

from __future__ import annotations

from app.cli.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="sluice bench")
