"""The front end's shared parts, one set per process: Redis, the job store, the relay, Celery."""

from __future__ import annotations

import logging

import redis
from celery import Celery

from app.admission import Admission
from app.apikeys import KeyInfo, KeyStore, anonymous_key
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
        self.keys = KeyStore(self.redis)
        self.admission = Admission.from_settings(settings, self.redis)

    def authenticate(self, raw_key: str | None) -> KeyInfo | None:
        """The identity behind an API key, or ``None`` if it may not use the gateway.

        No key means anonymous, when that is enabled.  ``sluice run``'s demo key
        is registered on its first use.

        :raises redis.RedisError: Redis cannot be reached.
        """
        if raw_key is None:
            if self.settings.allow_anonymous:
                return anonymous_key(self.settings.anonymous_tier)
            return None
        info = self.keys.verify(raw_key)
        if info is None and raw_key == self.settings.demo_key:
            try:
                info = self.keys.create("demo", "pro", raw=raw_key)[1]
            except ValueError:
                return None  # the demo key was revoked
        return info

    def submit(self, spec: JobSpec, job_id: str) -> int:
        """Store an admitted job; the caller must then :meth:`enqueue` it when it may start.

        :return: its position (session jobs ahead of it, or the queue depth).
        """
        spec.queue = self.settings.queue
        try:
            return self.jobs.create(spec, job_id)[1]
        except redis.RedisError:
            self._refund(job_id)
            raise

    def enqueue(self, job_id: str, spec: JobSpec) -> None:
        """Hand a stored job to the workers; on failure log an ``error`` event for it.

        A chat session's job that cannot be enqueued is taken off the session,
        so the jobs behind it are not held up.
        """
        try:
            self.celery.send_task("sluice.generate", args=[job_id], queue=self.settings.queue)
        except Exception as e:
            log.exception("could not enqueue job %s", job_id)
            self.events.append(job_id, "error", {"code": "unavailable",
                                                 "message": f"could not enqueue the job: {e}"},
                               status="error")
            self._refund(job_id)
            if spec.session:
                nxt = self.jobs.advance_session(spec.owner, spec.session, job_id)
                if nxt:
                    self.enqueue(nxt, spec)

    def _refund(self, job_id: str) -> None:
        try:
            self.admission.settle(job_id, 0, 0)
        except redis.RedisError:
            log.warning("could not refund job %s; its slot expires on its own", job_id)

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
