"""Aggregate figures of the whole gateway for ``GET /v1/status``, cached so polling is cheap.

A browser tab polls every two seconds; many tabs must not add up to load on
Redis.  So one :class:`StatusBoard` per front-end process answers from a
snapshot at most ``ttl_s`` old, and refreshing the snapshot costs:

* Redis: one pipelined round trip, ``ZCARD`` of the running set (generations
  in flight, every worker) and ``LLEN`` of the Celery queue (jobs waiting);
* the front end's own Prometheus samples (no network): open sockets, jobs its
  sockets follow, and the client TTFT and delivered TPOT histograms, summed over
  this front end's gunicorn processes when ``PROMETHEUS_MULTIPROC_DIR`` is set;
* workers online: a Celery ``ping`` broadcast, answered by every worker
  process, run in the background at most every ``workers_ttl_s`` — it waits
  ``ping_timeout_s`` for answers, which no request should wait for.

Figures are aggregates only: never a key, a job id or a prompt.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import Metric

from app import metrics
from tasks import keys

log = logging.getLogger(__name__)

#: The quantiles the status reports, as (name, q).
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


@dataclass(frozen=True)
class Buckets:
    """A histogram's cumulative bucket counts at one moment."""

    at: float
    bounds: tuple[float, ...]  # upper bounds, +Inf last
    counts: tuple[float, ...]  # cumulative, same length

    def minus(self, earlier: Buckets | None) -> tuple[float, ...]:
        """The counts observed since ``earlier`` (all of them when there is none)."""
        if earlier is None or earlier.bounds != self.bounds:
            return self.counts
        return tuple(max(0.0, a - b) for a, b in zip(self.counts, earlier.counts, strict=True))


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """Estimate the ``q`` quantile from cumulative bucket counts, as Prometheus's
    ``histogram_quantile`` does: linear within the bucket that holds the rank.

    :param bounds: bucket upper bounds, ascending, ``+Inf`` last.
    :param counts: cumulative counts per bound.
    :return: the estimate, or ``None`` when nothing was observed.
    """
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    i = bisect.bisect_left(counts, rank)
    i = min(i, len(counts) - 1)
    if math.isinf(bounds[i]):
        # Beyond the last finite bucket: the best honest answer is its bound.
        return bounds[i - 1] if i > 0 else None
    lower = bounds[i - 1] if i > 0 else 0.0
    below = counts[i - 1] if i > 0 else 0.0
    inside = counts[i] - below
    if inside <= 0:
        return bounds[i]
    return lower + (bounds[i] - lower) * (rank - below) / inside


class StatusBoard:
    """The cached figures of one front-end process.

    Example::

        board = StatusBoard(front.redis, front.celery, queue=front.settings.queue)
        figures = board.snapshot()        # at most ttl_s old
    """

    def __init__(self, client: redis.Redis, celery: Celery, *, queue: str, ttl_s: float = 2.0,
                 workers_ttl_s: float = 5.0, ping_timeout_s: float = 1.0,
                 window_s: float = 60.0) -> None:
        self.redis = client
        self.celery = celery
        self.queue = queue
        self.ttl_s = ttl_s
        self.workers_ttl_s = workers_ttl_s
        self.ping_timeout_s = ping_timeout_s
        self.window_s = window_s
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._taken_at = -math.inf
        #: metric name -> recent bucket snapshots, oldest first, for "recent" percentiles
        self._history: dict[str, deque[Buckets]] = {}
        self._workers: int | None = None
        self._workers_problem = ""
        self._workers_at = -math.inf
        self._pinging = False

    def snapshot(self) -> dict[str, Any]:
        """The figures, refreshed when older than ``ttl_s``; concurrent callers share a refresh."""
        self._maybe_ping()
        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._taken_at >= self.ttl_s:
                self._snapshot = self._take(now)
                self._taken_at = now
            problems = dict(self._snapshot["problems"])
            if self._workers_problem:
                problems["workers"] = self._workers_problem
            return {**self._snapshot, "workers_online": self._workers, "problems": problems}

    # -- the parts ---------------------------------------------------------
    def _take(self, now: float) -> dict[str, Any]:
        figures: dict[str, Any] = {"updated_at_ms": int(time.time() * 1000),
                                   "cache_s": self.ttl_s, "problems": {}}
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(keys.RUNNING)
            pipe.llen(self.queue)
            running, waiting = pipe.execute()
            figures["jobs_running"], figures["queue_depth"] = int(running), int(waiting)
        except redis.RedisError as e:
            figures["jobs_running"] = figures["queue_depth"] = None
            figures["problems"]["redis"] = str(e)
        families = {m.name: m for m in _collect()}
        figures["front_end"] = {
            "open_sockets": _gauge(families.get("sluice_open_sockets")),
            "followed_jobs": _gauge(families.get("sluice_followed_jobs")),
        }
        figures["ttft_ms"] = self._percentiles("sluice_client_ttft_seconds", families, now)
        figures["tpot_ms"] = self._percentiles("sluice_delivered_tpot_seconds", families, now)
        return figures

    def _percentiles(self, name: str, families: dict[str, Metric], now: float
                     ) -> dict[str, Any]:
        current = _buckets(families.get(name), now)
        history = self._history.setdefault(name, deque())
        while history and now - history[0].at > self.window_s:
            history.popleft()
        base = history[0] if history else None
        if current is not None:
            history.append(current)
        counts = current.minus(base) if current is not None else ()
        bounds = current.bounds if current is not None else ()
        body: dict[str, Any] = {
            "count": int(counts[-1]) if counts else 0,
            # No earlier snapshot yet: the figures cover the process's life so far.
            "window_s": round(now - base.at, 1) if base is not None else None,
        }
        for label, q in QUANTILES:
            value = quantile(q, bounds, counts)
            body[label] = round(value * 1000, 1) if value is not None else None
        return body

    def _maybe_ping(self) -> None:
        with self._lock:
            if self._pinging or time.monotonic() - self._workers_at < self.workers_ttl_s:
                return
            self._pinging = True
        # Under gunicorn's gevent workers this thread is a greenlet.
        threading.Thread(target=self._ping, name="sluice-status-ping", daemon=True).start()

    def _ping(self) -> None:
        try:
            replies = self.celery.control.ping(timeout=self.ping_timeout_s)
            self._workers = len(replies or [])
            self._workers_problem = ""
        except Exception as e:  # noqa: BLE001 - any broker failure means "unknown"
            log.warning("status: could not ping the workers: %s", e)
            self._workers = None
            self._workers_problem = f"cannot ping the workers: {e}"
        finally:
            self._workers_at = time.monotonic()
            self._pinging = False


def _collect() -> Iterable[Metric]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry.collect()
    # Only these: the process-wide registry would also run the gc and process collectors.
    wanted = (metrics.OPEN_SOCKETS, metrics.FOLLOWED_JOBS, metrics.CLIENT_TTFT,
              metrics.DELIVERED_TPOT)
    return [m for collector in wanted for m in collector.collect()]


def _gauge(family: Metric | None) -> int | None:
    if family is None:
        return None
    return int(sum(s.value for s in family.samples))


def _buckets(family: Metric | None, now: float) -> Buckets | None:
    if family is None:
        return None
    found = sorted((float(s.labels["le"]), s.value) for s in family.samples
                   if s.name.endswith("_bucket"))
    if not found:
        return None
    return Buckets(now, tuple(b for b, _ in found), tuple(c for _, c in found))
