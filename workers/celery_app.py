"""Builds Sluice's Celery app, tuned for long, I/O-bound, streaming jobs."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

from tasks.budget import Budget
from tasks.config import Settings
from tasks.events import AppendBatcher, EventLog
from tasks.jobs import JobStore
from workers.provider import Provider


class Runtime:
    """What a worker process needs to run jobs, built once per process on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The attempts running in this process, by job id (for cancels).
        self.attempts: dict[str, Any] = {}

    @cached_property
    def redis(self) -> redis.Redis:
        """The worker process's Redis client (a connection pool shared by its greenlets)."""
        return self.settings.redis_client()

    @cached_property
    def events(self) -> EventLog:
        """The event log."""
        return EventLog(self.redis, self.settings.event_ttl_s)

    @cached_property
    def appender(self) -> AppendBatcher:
        """Appends of all this process's attempts, batched into pipelines."""
        return AppendBatcher(self.events)

    @cached_property
    def jobs(self) -> JobStore:
        """The job store."""
        return JobStore(self.redis, job_ttl_s(self.settings))

    @cached_property
    def budget(self) -> Budget:
        """The token budgets, settled when a job ends."""
        return Budget(self.redis)

    @cached_property
    def provider(self) -> Provider:
        """The model provider client."""
        return Provider(self.settings)


def job_ttl_s(settings: Settings) -> int:
    """How long an unfinished job's record may live."""
    return settings.job_timeout_s + settings.event_ttl_s


def create_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app for workers and producers.

    :param settings: defaults to :meth:`Settings.from_env`.
    :return: the app; its :class:`Runtime` is ``app.sluice``.

    Example::

        app = create_celery(Settings.from_env())
        app.send_task("sluice.generate", args=[job_id], queue="sluice")
    """
    settings = settings or Settings.from_env()
    app = Celery("sluice", broker=settings.broker, include=["tasks.generate"])
    app.conf.update(
        # A worker dying mid-stream must not lose the job: ack only at the end,
        # and hand the message back if the process is lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Hundreds of greenlets ack at once: kombu's default pool of 10 Redis
        # connections runs dry, and the consumer then drops its connection
        # (and the messages it had prefetched) as if the broker were down.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "max_connections": settings.worker_concurrency + 50},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        # Streams may run for minutes: give warm shutdown time to let them end.
        worker_soft_shutdown_timeout=float(settings.job_timeout_s),
        worker_enable_soft_shutdown_on_idle=False,
        # No task-sent events: they cost the front end an extra publish per
        # job; Flower still sees every task from the workers' own events.
        task_send_sent_event=False,
        worker_send_task_events=settings.task_events,
    )
    app.sluice = Runtime(settings)  # type: ignore[attr-defined]
    if not settings.remote_control:
        make_control_read_only()
    return app


#: Control commands that change a worker; inspect commands (what Flower lists
#: workers and tasks with) and event switches stay.
MUTATING_COMMANDS = ("revoke", "revoke_by_stamped_headers", "terminate", "rate_limit",
                     "time_limit", "pool_grow", "pool_shrink", "pool_restart", "autoscale",
                     "shutdown", "add_consumer", "cancel_consumer")


def make_control_read_only() -> None:
    """Make this process's workers ignore control commands that would change them.

    Flower has no read-only mode; with these gone its buttons do nothing, and
    jobs are cancelled through Sluice (``cancel``), never by revoking tasks.
    """
    from celery.worker.control import Panel

    for name in MUTATING_COMMANDS:
        Panel.data.pop(name, None)
        Panel.meta.pop(name, None)


@worker_ready.connect
def _start_housekeeping(sender: object, **_: object) -> None:
    import gevent

    from workers import metrics
    from workers.reaper import listen_for_cancels, reap_forever

    app = sender.app  # type: ignore[attr-defined]
    metrics.serve(app.sluice.settings.metrics_port)
    gevent.spawn(reap_forever, app)
    gevent.spawn(listen_for_cancels, app.sluice)
