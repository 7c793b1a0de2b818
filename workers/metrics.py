"""Prometheus metrics of the workers, served on ``SLUICE_METRICS_PORT`` by each worker process.

Labels are bounded: outcome and error codes, model deployment and queue names;
never job ids or keys.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10,
                   20, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 1)

QUEUE_WAIT = Histogram("sluice_queue_wait_seconds", "Job enqueued -> worker started",
                       buckets=LATENCY_BUCKETS)
PROVIDER_TTFT = Histogram("sluice_provider_ttft_seconds",
                          "Provider request sent -> first token received", ["deployment"],
                          buckets=LATENCY_BUCKETS)
TPOT = Histogram("sluice_tpot_seconds", "Time per output token after the first",
                 ["deployment"], buckets=TPOT_BUCKETS)
E2E = Histogram("sluice_e2e_seconds", "Job created -> job ended", buckets=LATENCY_BUCKETS)
TOKENS = Counter("sluice_tokens_total", "Tokens processed", ["direction"])
JOBS = Counter("sluice_jobs_total", "Jobs ended, by outcome", ["outcome"])
PROVIDER_ERRORS = Counter("sluice_provider_errors_total", "Provider failures",
                          ["deployment", "code"])
IN_FLIGHT = Gauge("sluice_jobs_in_flight", "Generations running in this worker process")
QUEUE_DEPTH = Gauge("sluice_queue_depth", "Jobs waiting in a Celery queue", ["queue"])
COOLED_DOWN = Gauge("sluice_deployments_cooled_down", "Provider deployments in cool-down")


def serve(port: int) -> None:
    """Expose this process's metrics on ``port`` (0 disables)."""
    if port:
        start_http_server(port, addr="0.0.0.0")
        log.info("worker metrics on :%d/metrics", port)
