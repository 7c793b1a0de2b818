"""``report.html``: one self-contained page (inline CSS and SVG, no network) with the plots."""

from __future__ import annotations

from html import escape
from typing import Any

from app.cli.bench.output import Rows, added_rows, cost_rows, environment, latency_rows, notes
from app.cli.bench.runner import BenchResult, StepResult
from app.cli.bench.svg import PALETTE, Series, cdf_points, line_chart

CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.meta{color:#555;font-size:13px}.note{background:#fff8e1;padding:6px 10px;margin:4px 0}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts svg{border:1px solid #ddd}
code{background:#f4f4f4;padding:1px 4px}
"""


def _table(rows: Rows) -> str:
    headers, body = rows
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>"
                    for r in body)
    return f"<table><tr>{head}</tr>{lines}</table>"


def _series_style(result: BenchResult) -> dict[tuple[int, str], tuple[str, bool]]:
    indices = sorted({s.index for s in result.steps})
    both = _both(result)
    return {(s.index, s.target): (PALETTE[indices.index(s.index) % len(PALETTE)],
                                  both and s.target == "direct") for s in result.steps}


def _both(result: BenchResult) -> bool:
    return len({s.target for s in result.steps}) > 1


def _cdf_chart(result: BenchResult, attr: str, title: str, x_label: str) -> str:
    style = _series_style(result)
    series = []
    for s in result.steps:
        values = [getattr(r, attr) for r in s.records if r.ok and getattr(r, attr) is not None]
        color, dashed = style[(s.index, s.target)]
        series.append(Series(f"{s.step.label} {s.target}", cdf_points(values), color, dashed))
    return line_chart(series, title=title, x_label=x_label, y_label="fraction of requests",
                      y_from_zero=True)


def _load_charts(result: BenchResult) -> list[str]:
    by_target: dict[str, list[StepResult]] = {}
    for s in result.steps:
        by_target.setdefault(s.target, []).append(s)
    kinds = {s.step.kind for s in result.steps}
    if len({s.index for s in result.steps}) < 2 or len(kinds) != 1:
        return []
    kind = kinds.pop()
    x_label = {"sockets": "sockets (one request each)", "concurrency": "concurrent streams",
               "rate": "offered rate (req/s)", "poisson": "offered rate (req/s)"}[kind]
    values = [s.step.value for s in result.steps]
    log_x = max(values) / min(values) >= 20

    def series(key: str, stat: str, names: tuple[str, ...]) -> list[Series]:
        out = []
        for n, (target, steps) in enumerate(sorted(by_target.items(), reverse=True)):
            for m, name in enumerate(names):
                pts = [(s.step.value, s.agg.get(key, {}).get(name)) for s in steps]
                out.append(Series(f"{stat} {name} {target}",
                                  [(x, y) for x, y in pts if y is not None],
                                  PALETTE[m % len(PALETTE)], dashed=n > 0))
        return out

    charts = [
        line_chart(series("ttft_ms", "TTFT", ("p50", "p90", "p99")),
                   title="TTFT vs load", x_label=x_label, y_label="ms", log_x=log_x,
                   markers=True),
        line_chart(series("tpot_ms", "TPOT", ("p50", "p99")), title="TPOT vs load",
                   x_label=x_label, y_label="ms", log_x=log_x, markers=True),
    ]
    tput = [Series(f"tok/s {t}", [(s.step.value, s.agg["tok_per_s"]) for s in steps],
                   PALETTE[n], dashed=n > 0)
            for n, (t, steps) in enumerate(sorted(by_target.items(), reverse=True))]
    charts.append(line_chart(tput, title="Output token throughput vs load", x_label=x_label,
                             y_label="tokens/s", log_x=log_x, markers=True))
    cpu_pts = [(s.step.value, s.cpu["us_per_token"]) for s in by_target.get("sluice", [])
               if s.cpu and s.cpu.get("us_per_token") is not None]
    if cpu_pts:
        charts.append(line_chart([Series("Sluice CPU per token", cpu_pts)],
                                 title="Sluice CPU per relayed token", x_label=x_label,
                                 y_label="CPU us per token", log_x=log_x, markers=True))
    return charts


def _errors(result: BenchResult) -> str:
    rows: list[list[str]] = []
    for s in result.steps:
        messages: dict[str, str] = {}
        for r in s.records:
            if r.error and r.error not in messages:
                messages[r.error] = r.message or ""
        rows.extend([f"{s.step.label} {s.target}", code, str(n), messages.get(code, "")]
                    for code, n in s.agg["errors"].items())
    if not rows:
        return "<p>No errors.</p>"
    return _table((["step / target", "code", "count", "first message"], rows))


def _config(result: BenchResult) -> dict[str, Any]:
    cfg = result.config.as_json()
    return {k: v for k, v in cfg.items() if k != "steps" and v not in (None, (), [], {})}


def render(result: BenchResult) -> str:
    """The report page."""
    env = environment()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sluice bench "
             f"{escape(env['time'])}</title><style>{CSS}</style></head><body>",
             "<h1>sluice bench</h1>",
             f"<p class='meta'>{escape(env['time'])} on {escape(str(env['host']))} "
             f"({env['cpus']} CPUs, Python {escape(env['python'])})<br>"
             f"<code>{escape(_command(env['argv']))}</code></p>"]
    parts.extend(f"<p class='note'>{escape(n)}</p>" for n in notes(result))
    parts.append("<h2>Latency (ms)</h2><p class='meta'>TTFT: request sent to first token "
                 "received. TPOT: (last token - first token) / (tokens - 1). ITL: gaps "
                 "between token frames. Queue: the worker's queue wait.</p>")
    parts.append(_table(latency_rows(result)))
    parts.append("<h2>Throughput, integrity and cost</h2><p class='meta'>lost/dup/text: "
                 "events missing or repeated in the seq order, and texts that differ from "
                 "the expected one. CPU us/tok: user+system CPU of Sluice's processes "
                 "(web, workers, Redis; not the model, not the bench) per relayed token; "
                 "net: minus their idle CPU.</p>")
    parts.append(_table(cost_rows(result)))
    if result.added:
        parts.append("<h2>Added by Sluice</h2><p class='meta'>Sluice minus the same load sent "
                     "straight to the model, per percentile (ms).</p>")
        parts.append(_table(added_rows(result)))
    legend = "<p class='meta'>Solid lines: Sluice; dashed: the model directly.</p>" \
        if _both(result) else ""
    parts.append(f"<h2>Distributions</h2>{legend}<div class='charts'>")
    parts.append(_cdf_chart(result, "ttft_ms", "TTFT distribution (CDF)", "TTFT (ms)"))
    parts.append(_cdf_chart(result, "tpot_ms", "TPOT distribution (CDF)", "TPOT (ms)"))
    parts.append(_cdf_chart(result, "e2e_ms", "End-to-end latency (CDF)", "E2E (ms)"))
    parts.append("</div>")
    load = _load_charts(result)
    if load:
        parts.append(f"<h2>Latency vs load</h2>{legend}<div class='charts'>" + "".join(load)
                     + "</div>")
    parts.append("<h2>Errors</h2>" + _errors(result))
    if result.stack:
        parts.append("<h2>Stack</h2>" + _table((["setting", "value"], [
            [k, str(v)] for k, v in result.stack.items()])))
    parts.append("<h2>Configuration</h2>" + _table((["option", "value"], [
        [k, str(v)] for k, v in _config(result).items()])))
    parts.append("</body></html>\n")
    return "".join(parts)


def _command(argv: list[str]) -> str:
    """The command line as a user types it (``sluice bench`` or ``-m app.cli.bench``)."""
    args = argv[2:] if argv[1:2] == ["bench"] else argv[1:]
    return " ".join(["sluice bench", *args])
