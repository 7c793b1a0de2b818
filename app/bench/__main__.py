"""Run ``sluice bench`` as ``python -m app.bench``."""

from __future__ import annotations

from app.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="sluice bench")
