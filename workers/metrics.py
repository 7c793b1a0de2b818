"""Prometheus metrics of the workers, served on ``SLUICE_METRICS_PORT`` by each worker process.

Labels are bounded: outcome and error codes, model deployment and queue names;
never job ids or keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tasks.config import Settings
from tasks.routing import Router
from tasks.runtime import Report

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
FAILOVERS = Counter("sluice_failovers_total", "Provider requests that failed and were "
                    "tried on another deployment or again", ["deployment", "code"])


class DeploymentCollector(Collector):
    """The deployments' shared state, read from Redis when scraped (one pipeline).

    Every worker shows the same gateway-wide figures; labels are the
    configured deployment names.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            states = self.router.states()
        except redis.RedisError as e:
            log.warning("deployment metrics: Redis unreachable (%s)", e)
            return
        families = {
            "in_flight": GaugeMetricFamily("sluice_deployment_in_flight",
                                           "Requests in flight on the deployment (all workers)",
                                           labels=["deployment"]),
            "tokens": GaugeMetricFamily("sluice_deployment_tokens_this_minute",
                                        "Tokens counted on the deployment this minute, "
                                        "reservations included", labels=["deployment"]),
            "ttft": GaugeMetricFamily("sluice_deployment_ttft_seconds",
                                      "Moving average (EWMA) of the deployment's TTFT",
                                      labels=["deployment"]),
            "cooldown": GaugeMetricFamily("sluice_deployment_cooldown_seconds",
                                          "Seconds left of the deployment's cooldown (0: healthy)",
                                          labels=["deployment"]),
        }
        for s in states:
            families["in_flight"].add_metric([s.name], s.in_flight)
            families["tokens"].add_metric([s.name], s.tokens_this_minute)
            if s.ttft_ms is not None:
                families["ttft"].add_metric([s.name], s.ttft_ms / 1000)
            families["cooldown"].add_metric([s.name], s.cooldown_ms / 1000)
        yield from families.values()


def record(report: Report) -> None:
    """Count one attempt's outcome (see :class:`tasks.runtime.Report`)."""
    if report.outcome == "lost":
        return  # the attempt that took the job over counts it
    JOBS.labels(report.outcome).inc()
    for deployment, code in report.failovers:
        FAILOVERS.labels(deployment, code).inc()
    if report.error_code:
        PROVIDER_ERRORS.labels(report.deployment, report.error_code).inc()
    if report.outcome != "done":
        return
    if report.queue_wait_s is not None:
        QUEUE_WAIT.observe(report.queue_wait_s)
    if report.e2e_s is not None:
        E2E.observe(report.e2e_s)
    if report.provider_ttft_s is not None:
        PROVIDER_TTFT.labels(report.deployment).observe(report.provider_ttft_s)
    if report.tpot_s is not None:
        TPOT.labels(report.deployment).observe(report.tpot_s)
    TOKENS.labels("out").inc(report.completion_tokens)
    if report.prompt_tokens:
        TOKENS.labels("in").inc(report.prompt_tokens)


def serve(port: int, in_flight: Callable[[], int], router: Router | None = None,
          host: str | None = None) -> None:
    """Expose this process's metrics on ``host:port`` (port 0 disables).

    :param in_flight: how many generations the process is running now.
    :param router: adds the deployments' shared state, read when scraped.
    :param host: the address to listen on; ``None`` reads ``SLUICE_HOST``
        (:attr:`Settings.host`, loopback by default).
    """
    IN_FLIGHT.set_function(in_flight)
    if port and router is not None:
        REGISTRY.register(DeploymentCollector(router))
    if port:
        addr = host if host is not None else Settings.from_env().host
        start_http_server(port, addr=addr)
        log.info("worker metrics on %s:%d/metrics", addr, port)
