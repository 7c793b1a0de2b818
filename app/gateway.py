"""The front end's shared parts, one set per process: Redis, the job store, the relay, Celery."""

from __future__ import annotations

import logging

import redis
from celery import Celery

from app.relay import Relay
from tasks.config import Settings
from tasks.events import EventLog
from tasks.jobs import JobSpec, JobStore
from workers.celery_app import create_celery, job_ttl_s

log = logging.getLogger(__name__)


class Gateway:
    """Submits jobs and reads their logs on behalf of every socket of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = settings.redis_client()
        self.jobs = JobStore(self.redis, job_ttl_s(settings))
        self.events = EventLog(self.redis, settings.event_ttl_s)
        self.relay = Relay(self.redis)
        self.celery: Celery = create_celery(settings)

    def submit(self, spec: JobSpec) -> tuple[str, int]:
        """Store a job; the caller must then :meth:`enqueue` it when it may start.

        :return: the job id and its position (session jobs ahead of it, or the queue depth).
        """
        spec.queue = self.settings.queue
        return self.jobs.create(spec)

    def enqueue(self, job_id: str) -> None:
        """Hand a stored job to the workers; on failure log an ``error`` event for it."""
        try:
            self.celery.send_task("sluice.generate", args=[job_id], queue=self.settings.queue)
        except Exception as e:
            log.exception("could not enqueue job %s", job_id)
            self.events.append(job_id, "error", {"code": "unavailable",
                                                 "message": f"could not enqueue the job: {e}"},
                               status="error")

    def ready(self) -> dict[str, str]:
        """Check Redis and the broker; return a problem per failing part."""
        problems = {}
        try:
            self.redis.ping()
        except redis.RedisError as e:
            problems["redis"] = str(e)
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as e:  # noqa: BLE001 - report any broker failure
            problems["broker"] = str(e)
        return problems
