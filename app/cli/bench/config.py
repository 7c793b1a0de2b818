"""What a bench run does: its targets, load steps, prompts, SLOs and stop rules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Load kinds: ``sockets`` (N sockets, one request each, released together),
#: ``concurrency`` (N streams, each sending requests back to back), ``rate``
#: (constant arrivals per second) and ``poisson`` (gamma inter-arrivals).
KINDS = ("sockets", "concurrency", "rate", "poisson")


class BenchError(Exception):
    """A problem the user can fix; shown as one line, exit status 2."""


@dataclass(frozen=True)
class Step:
    """One load level; every step is bounded by a request count and a duration."""

    kind: str
    value: float
    requests: int
    duration_s: float
    burstiness: float = 1.0

    @property
    def label(self) -> str:
        """A short name such as ``sockets=100`` or ``poisson=5/s``."""
        v = f"{self.value:g}"
        if self.kind in ("rate", "poisson"):
            return f"{self.kind}={v}/s" + (f" b={self.burstiness:g}" if self.kind == "poisson"
                                            and self.burstiness != 1 else "")
        return f"{self.kind}={v}"

    @property
    def streams(self) -> int:
        """Sockets or streams the step opens (its offered concurrency)."""
        return max(1, int(self.value))


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput; ``None`` means no bound."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, ttft_ms: float | None, tpot_ms: float | None, e2e_ms: float | None) -> bool:
        """Whether one successful request meets every bound."""
        for bound, value in ((self.ttft_ms, ttft_ms), (self.tpot_ms, tpot_ms),
                             (self.e2e_ms, e2e_ms)):
            if bound is not None and value is not None and value > bound:
                return False
        return True

    @property
    def empty(self) -> bool:
        """Whether no bound is set."""
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None


@dataclass(frozen=True)
class StackOptions:
    """How ``--start-stack`` builds its private Sluice."""

    workers: int = 1
    worker_concurrency: int = 500
    webs: int = 1
    mock_ttft_ms: float = 200.0
    mock_itl_ms: float = 100.0
    mock_jitter_ms: float = 0.0
    mock_output_tokens: int = 50
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``sluice bench`` invocation does."""

    steps: tuple[Step, ...]
    urls: tuple[str, ...] = ()
    direct_url: str | None = None
    start_stack: StackOptions | None = None
    compare_direct: bool = False
    #: Also run each step through Sluice's OpenAI-compatible HTTP API (SSE, the openai SDK).
    http: bool = False
    api_key: str | None = None
    direct_api_key: str = "sk-bench"
    model: str = "mock-1"
    direct_model: str | None = None
    input_tokens: int = 32
    output_tokens: int = 50
    prompts_file: Path | None = None
    seed: int = 0
    slo: Slo = field(default_factory=Slo)
    sweep: bool = False
    max_error_rate: float = 0.01
    min_gain: float = 0.1
    connections: int = 64
    timeout_s: float = 120.0
    warmup: int = 4
    verify_text: str = "auto"
    out_dir: Path | None = None
    progress: bool = True

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready copy (paths as strings, no secrets)."""
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else None
        d["direct_api_key"] = "***"
        d["prompts_file"] = str(self.prompts_file) if self.prompts_file else None
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        return d


def parse_slo(specs: tuple[str, ...]) -> Slo:
    """Parse ``--slo ttft:500 tpot:50`` (several options or space-separated pairs).

    :raises BenchError: an unknown metric or a value that is not a positive number.
    """
    bounds: dict[str, float] = {}
    for spec in specs:
        for part in spec.replace(",", " ").split():
            name, _, value = part.partition(":")
            name = name.strip().lower()
            if name not in ("ttft", "tpot", "e2e"):
                raise BenchError(f"--slo {part!r}: the metric must be ttft, tpot or e2e")
            bounds[f"{name}_ms"] = _positive(value, f"--slo {part!r}")
    return Slo(**bounds)


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """Parse ``--sweep concurrency:1,10,100`` or ``--sweep rate:1,2,4``.

    :raises BenchError: an unknown kind or a bad value list.
    """
    kind, _, values = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in ("concurrency", "rate", "sockets", "poisson"):
        raise BenchError(f"--sweep {spec!r}: expected concurrency:, rate:, poisson: or "
                         "sockets: followed by comma-separated values")
    levels = [_positive(v, f"--sweep {spec!r}") for v in values.split(",") if v.strip()]
    if not levels:
        raise BenchError(f"--sweep {spec!r}: give at least one value, e.g. {kind}:1,10,100")
    return kind, levels


def build_steps(kind: str, values: list[float], requests: int | None, duration_s: float,
                burstiness: float) -> tuple[Step, ...]:
    """Turn load levels into bounded steps.

    Without ``--requests``: a ``sockets`` step sends one request per socket,
    ``concurrency`` sends five per stream (at least 20), a rate sends ten
    seconds' worth (at least 20).  A ``concurrency`` step always sends at least
    one request per stream, or it would not reach its concurrency.
    """
    steps = []
    for v in values:
        if kind == "sockets":
            n = int(v)
        elif requests is not None:
            n = max(requests, int(v)) if kind == "concurrency" else requests
        elif kind == "concurrency":
            n = max(20, 5 * int(v))
        else:
            n = max(20, math.ceil(10 * v))
        steps.append(Step(kind, v, n, duration_s, burstiness))
    return tuple(steps)


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BenchError(f"{what}: {text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise BenchError(f"{what}: {text!r} must be a positive number")
    return value
