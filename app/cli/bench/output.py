"""Results as text: the summary tables, ``results.json`` and ``summary.csv``."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from typing import Any, TextIO

from app.cli.bench.runner import BenchResult, StepResult

CSV_COLUMNS = (
    "step", "label", "kind", "value", "target", "requests", "ok", "errors", "error_rate",
    "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p95_ms", "ttft_p99_ms",
    "tpot_mean_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p95_ms", "tpot_p99_ms",
    "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "queue_p50_ms", "queue_p99_ms",
    "req_per_s", "tok_per_s", "goodput_req_per_s", "lost", "dup", "mismatch",
    "cpu_us_per_token", "cpu_net_us_per_token", "added_ttft_p50_ms", "added_ttft_p90_ms",
    "added_ttft_p99_ms")


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _p(agg: dict[str, Any], key: str, p: str) -> Any:
    return agg.get(key, {}).get(p)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


Rows = tuple[list[str], list[list[str]]]


def latency_rows(result: BenchResult) -> Rows:
    """Headers and rows of the latency table."""
    rows = [[f"{s.step.label} {s.target}", f"{s.agg['ok']}/{s.agg['requests']}",
             *(_f(_p(s.agg, k, p)) for k, p in (
                 ("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"),
                 ("tpot_ms", "p50"), ("tpot_ms", "p99"), ("itl_ms", "p99"),
                 ("e2e_ms", "p50"), ("e2e_ms", "p99"), ("queue_ms", "p50"),
                 ("queue_ms", "p99")))]
            for s in result.steps]
    return (["step / target", "ok/req", "TTFT p50", "p90", "p99", "TPOT p50", "p99", "ITL p99",
             "E2E p50", "p99", "queue p50", "p99"], rows)


def cost_rows(result: BenchResult) -> Rows:
    """Headers and rows of the throughput, integrity and CPU table."""
    rows = []
    for s in result.steps:
        cpu = s.cpu or {}
        good = s.agg.get("goodput")
        rows.append([f"{s.step.label} {s.target}", _f(s.agg["req_per_s"], 2),
                     _f(s.agg["tok_per_s"], 0), _f(good["req_per_s"], 2) if good else "-",
                     _errors(s), f"{s.agg['lost']}/{s.agg['dup']}/{s.agg['mismatch']}",
                     _f(cpu.get("us_per_token")), _f(cpu.get("net_us_per_token")),
                     _roles(cpu), _f(_p(s.client, "lag_ms", "p99"))])
    return (["step / target", "req/s", "tok/s", "goodput/s", "errors", "lost/dup/text",
             "CPU us/tok", "net", "by role (us/tok)", "client lag p99"], rows)


def added_rows(result: BenchResult) -> Rows:
    """Headers and rows of Sluice's added latency (Sluice minus direct) per step and path.

    The ``sluice`` rows are the WebSocket path; ``http`` rows (``--http``) the
    OpenAI-compatible API, streamed as SSE.
    """
    rows = []
    both = sorted([(i, "sluice", a) for i, a in result.added.items()] +
                  [(i, "http", a) for i, a in result.added_http.items()],
                  key=lambda x: (x[0], x[1] != "sluice"))
    for i, target, a in both:
        label = next(s.step.label for s in result.steps if s.index == i)
        if result.added_http:
            label = f"{label} {target}"
        rows.append([label, *(_f(a["ttft_ms"].get(p)) for p in ("p50", "p90", "p95", "p99")),
                     _f(a["tpot_ms"].get("p50"), 2), _f(a.get("tpot_ratio_p50"), 3),
                     _f(a["e2e_ms"].get("p50")), _f(a["e2e_ms"].get("p99"))])
    return (["step", "TTFT +p50", "+p90", "+p95", "+p99", "TPOT +p50", "TPOT ratio",
             "E2E +p50", "+p99"], rows)


def notes(result: BenchResult) -> list[str]:
    """Caveats a reader of the figures must know."""
    out = []
    if result.stop_reason:
        out.append(f"sweep stopped: {result.stop_reason}")
    if result.interrupted:
        out.append("interrupted: the figures cover only what finished before Ctrl-C")
    for s in result.steps:
        lag = _p(s.client, "lag_ms", "p99")
        if lag is not None and lag > 20:
            out.append(f"{s.step.label} {s.target}: the bench's own event loop lagged "
                       f"{lag:.0f} ms at p99; client-side delay is in these latencies")
        if s.client.get("connect_failures"):
            out.append(f"{s.step.label} {s.target}: {s.client['connect_failures']} sockets "
                       "failed to open")
    return out


def print_summary(result: BenchResult, out: TextIO = sys.stdout) -> None:
    """Print the latency table, the throughput/integrity table and Sluice's added latency."""
    if not result.steps:
        out.write("sluice bench: no step completed\n")
        return
    out.write("\nLatency (ms; TTFT = send to first token, TPOT = (last - first) / (tokens - 1))\n")
    out.write(table(*latency_rows(result)) + "\n")
    out.write("\nThroughput, integrity and cost (lost/dup/text = lost and duplicated events, "
              "wrong texts)\n")
    out.write(table(*cost_rows(result)) + "\n")
    if result.added:
        out.write("\nAdded by Sluice (Sluice minus direct, ms)\n")
        out.write(table(*added_rows(result)) + "\n")
    for n in notes(result):
        out.write(f"note: {n}\n")
    out.flush()


def _errors(s: StepResult) -> str:
    errs = s.agg["errors"]
    return ",".join(f"{k}:{v}" for k, v in errs.items()) if errs else "0"


def _roles(cpu: dict[str, Any]) -> str:
    by = cpu.get("us_per_token_by_role") or {}
    return " ".join(f"{k} {v:.0f}" for k, v in by.items()) or "-"


def environment() -> dict[str, Any]:
    """Where and when the run happened."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "argv": sys.argv}


def as_json(result: BenchResult) -> dict[str, Any]:
    """The full record: config, environment, per-step aggregates, every request."""
    return {
        "format": "sluice-bench/1",
        "config": result.config.as_json(),
        "environment": environment(),
        "stack": result.stack,
        "interrupted": result.interrupted,
        "stop_reason": result.stop_reason,
        "steps": [{"index": s.index, "label": s.step.label, "kind": s.step.kind,
                   "value": s.step.value, "target": s.target, "interrupted": s.interrupted,
                   "aggregate": s.agg, "cpu": s.cpu, "client": s.client} for s in result.steps],
        "added": {str(k): v for k, v in result.added.items()},
        "added_http": {str(k): v for k, v in result.added_http.items()},
        "records": [r.as_json() for s in result.steps for r in s.records],
    }


def csv_rows(result: BenchResult) -> list[dict[str, Any]]:
    """One flat row per step and target."""
    rows = []
    for s in result.steps:
        a, cpu = s.agg, s.cpu or {}
        added = {"sluice": result.added, "http": result.added_http}.get(s.target, {}).get(
            s.index, {}).get("ttft_ms", {})
        row: dict[str, Any] = {
            "step": s.index, "label": s.step.label, "kind": s.step.kind, "value": s.step.value,
            "target": s.target, "requests": a["requests"], "ok": a["ok"],
            "errors": sum(a["errors"].values()), "error_rate": a["error_rate"],
            "req_per_s": a["req_per_s"], "tok_per_s": a["tok_per_s"],
            "goodput_req_per_s": a.get("goodput", {}).get("req_per_s"), "lost": a["lost"],
            "dup": a["dup"], "mismatch": a["mismatch"],
            "cpu_us_per_token": cpu.get("us_per_token"),
            "cpu_net_us_per_token": cpu.get("net_us_per_token"),
            **{f"added_ttft_{p}_ms": added.get(p) for p in ("p50", "p90", "p99")}}
        for key in ("ttft", "tpot"):
            for p in ("mean", "p50", "p90", "p95", "p99"):
                row[f"{key}_{p}_ms"] = _p(a, f"{key}_ms", p)
        for key in ("itl", "e2e", "queue"):
            for p in ("p50", "p99"):
                row[f"{key}_{p}_ms"] = _p(a, f"{key}_ms", p)
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def clean(v: Any) -> Any:
    """``v`` with every NaN or infinity replaced by ``None`` (JSON has neither)."""
    # JSON has no NaN or infinity: write null.
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v
