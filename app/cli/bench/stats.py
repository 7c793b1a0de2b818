"""Aggregates: percentiles, throughput, integrity, goodput, Sluice's added latency, saturation."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from app.cli.bench.config import Slo
from app.cli.bench.record import RequestRecord

PERCENTILES = (50, 90, 95, 99)
#: Distributions every step reports (record attribute -> result key).
METRICS = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "e2e_ms": "e2e_ms",
           "queue_ms": "queue_ms", "server_ttft_ms": "server_ttft_ms"}


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile with linear interpolation (numpy's default method)."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def dist(values: Iterable[float | None]) -> dict[str, Any]:
    """Count, mean, min, p50/p90/p95/p99 and max of the values that are not ``None``."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(v), "mean": sum(v) / len(v), "min": v[0]}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(v, p)
    out["max"] = v[-1]
    return out


def aggregate(records: Sequence[RequestRecord], itl_ms: Iterable[float], slo: Slo,
              wall_s: float) -> dict[str, Any]:
    """Summarise one step of one target.

    Latencies are over successful requests; throughput divides by the time
    from the first send to the last end; ``tokens`` counts every delivered
    token, also those of requests that failed later.
    """
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None)
    out: dict[str, Any] = {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(errors.most_common()),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "wall_s": wall_s,
    }
    for attr, key in METRICS.items():
        out[key] = dist(getattr(r, attr) for r in ok)
    # A request cut short by Ctrl-C still measured a valid time to first token.
    out["ttft_ms"] = dist(r.ttft_ms for r in records if r.ok or r.error == "interrupted")
    out["itl_ms"] = dist(itl_ms)
    out["tokens"] = sum(r.tokens for r in records)
    out["output_tokens_ok"] = sum(r.tokens for r in ok)
    out["req_per_s"] = len(ok) / wall_s if wall_s > 0 else 0.0
    out["tok_per_s"] = out["output_tokens_ok"] / wall_s if wall_s > 0 else 0.0
    out["lost"] = sum(r.lost for r in records)
    out["dup"] = sum(r.dup for r in records)
    out["mismatch"] = sum(1 for r in records if r.mismatch)
    out["restarts"] = sum(r.restarts for r in records)
    if not slo.empty:
        good = sum(1 for r in ok if slo.met(r.ttft_ms, r.tpot_ms, r.e2e_ms))
        out["goodput"] = {"requests": good, "fraction": good / len(records) if records else 0.0,
                          "req_per_s": good / wall_s if wall_s > 0 else 0.0}
    return out


def added_latency(sluice: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """Sluice minus direct, per percentile, for TTFT, TPOT and E2E; and the TPOT p50 ratio."""
    out: dict[str, Any] = {}
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s, d = sluice.get(key, {}), direct.get(key, {})
        out[key] = {f"p{p}": s[f"p{p}"] - d[f"p{p}"] for p in PERCENTILES
                    if f"p{p}" in s and f"p{p}" in d}
        if "mean" in s and "mean" in d:
            out[key]["mean"] = s["mean"] - d["mean"]
    s50, d50 = sluice.get("tpot_ms", {}).get("p50"), direct.get("tpot_ms", {}).get("p50")
    out["tpot_ratio_p50"] = s50 / d50 if s50 and d50 else None
    return out


def saturation(previous: dict[str, Any] | None, current: dict[str, Any], slo: Slo,
               max_error_rate: float, min_gain: float) -> str | None:
    """Why a sweep should stop after ``current``, or ``None`` to go on.

    Stops when the error rate exceeds ``max_error_rate``, when TTFT p99 or
    TPOT p99 breaks the SLO, or when token throughput grew by less than
    ``min_gain`` over the previous step (more load bought no more output).
    """
    if current["error_rate"] > max_error_rate:
        return f"error rate {current['error_rate']:.1%} > {max_error_rate:.1%}"
    for key, bound in (("ttft_ms", slo.ttft_ms), ("tpot_ms", slo.tpot_ms)):
        p99 = current.get(key, {}).get("p99")
        if bound is not None and p99 is not None and p99 > bound:
            return f"{key[:4].upper()} p99 {p99:.0f} ms > SLO {bound:g} ms"
    if previous is not None and previous["tok_per_s"] > 0 \
            and current["tok_per_s"] < (1 + min_gain) * previous["tok_per_s"]:
        return (f"throughput {current['tok_per_s']:.0f} tok/s grew < {min_gain:.0%} over "
                f"{previous['tok_per_s']:.0f}")
    return None
