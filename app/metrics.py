"""Prometheus metrics of the front end, and ``GET /metrics``.

Under gunicorn with several worker processes, ``sluice web`` sets
``PROMETHEUS_MULTIPROC_DIR`` so every process writes its samples there and
``/metrics`` aggregates them.  Labels are bounded: never a job id or a key.
"""

from __future__ import annotations

import json
import os

from flask import Blueprint, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

bp = Blueprint("metrics", __name__)

#: Latency buckets in seconds, dense where LLM latencies live.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10,
                   20, 30, 60, 120)

OPEN_SOCKETS = Gauge("sluice_open_sockets", "WebSocket connections open",
                     multiprocess_mode="livesum")
FOLLOWED_JOBS = Gauge("sluice_followed_jobs", "Jobs followed by this front end's sockets",
                      multiprocess_mode="livesum")
JOBS_SUBMITTED = Counter("sluice_jobs_submitted_total", "Jobs accepted and enqueued")
REQUESTS_REJECTED = Counter("sluice_requests_rejected_total",
                            "Client requests answered with an error frame or status",
                            ["code"])
CLIENT_TTFT = Histogram("sluice_client_ttft_seconds",
                        "Front end accepted the prompt -> first token sent to the client",
                        buckets=LATENCY_BUCKETS)
FRAMES_SENT = Counter("sluice_frames_sent_total", "Job event frames sent to clients")
#: Time per output token in seconds, dense where LLM streams live.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 1)
DELIVERED_TPOT = Histogram("sluice_delivered_tpot_seconds",
                           "TPOT of the jobs whose done frame this front end delivered",
                           buckets=TPOT_BUCKETS)


def observe_done(frame: str) -> None:
    """Count the TPOT of a delivered ``done`` frame (one JSON parse per job, not per token)."""
    tpot_ms = json.loads(frame).get("metrics", {}).get("tpot_ms")
    if isinstance(tpot_ms, int | float):
        DELIVERED_TPOT.observe(tpot_ms / 1000)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition of this front end (all its processes)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        data = generate_latest(registry)
    else:
        data = generate_latest()
    return Response(data, mimetype=CONTENT_TYPE_LATEST)
