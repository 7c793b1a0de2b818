"""Builds Sluice's Celery app, tuned for long, I/O-bound, streaming jobs."""

from __future__ import annotations

import functools
import logging
import time
from functools import cached_property
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready
from celery.worker.consumer import Consumer as CeleryConsumer

from tasks.budget import Budget
from tasks.config import Settings
from tasks.consumers import QueueConsumers, unserved
from tasks.deployments import Providers as ProvidersConfig
from tasks.deployments import load_providers
from tasks.events import AppendBatcher, EventLog
from tasks.generate import Attempt
from tasks.jobs import JobStore
from tasks.queue import Dispatcher, make_celery
from tasks.routing import Router
from tasks.runtime import Report
from tasks.warmup import load_scripts
from workers import metrics
from workers.broker import keep_control_alive, share_redis_clients
from workers.provider import Providers

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What a worker process needs to run jobs (a :class:`tasks.runtime.Runtime`).

    Built with the Celery app; its Redis pool connects on first use, so
    building it opens no connection.
    """

    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        #: The worker process's Redis client (a connection pool shared by its greenlets).
        self.redis = settings.redis_client()
        self.events = EventLog(self.redis, settings.event_ttl_s)
        #: Appends of all this process's attempts, batched into pipelines.
        self.appender = AppendBatcher(self.events)
        self.jobs = JobStore(self.redis, settings.job_ttl_s)
        self.budget = Budget(self.redis)
        self.dispatcher = Dispatcher(celery, self.jobs, self.events, self.budget)
        self.attempts: dict[str, Attempt] = {}
        #: The providers config (read when the app is built: a bad file stops the worker).
        self.config: ProvidersConfig = load_providers(settings)
        self.router = Router(self.redis, self.config, settings.job_timeout_s)

    @cached_property
    def providers(self) -> Providers:
        """The clients of every deployment."""
        return Providers(self.config, self.settings.worker_concurrency)

    def warm(self) -> None:
        """Connect to Redis, load its scripts, build the provider and call it once per pool.

        Done at start, so this process's first job does not pay for it; best
        effort: whatever fails is left for the jobs to report.
        """
        try:
            load_scripts(self.redis, self.jobs, self.events, self.budget, self.router)
        except redis.RedisError as e:
            log.warning("warm-up: Redis unreachable (%s)", e)
        try:
            self.providers.warm()
        except Exception:  # a warm-up must not stop the worker
            log.exception("warm-up: could not build the provider client")

    def record(self, report: Report) -> None:
        """Count an attempt's outcome in this process's metrics."""
        metrics.record(report)


def create_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app for workers and producers.

    :param settings: defaults to :meth:`Settings.from_env`.
    :return: the app; its :class:`WorkerRuntime` is ``app.sluice``.

    Example::

        app = create_celery(Settings.from_env())
        Dispatcher(app, jobs, events, budget).enqueue(job_id, "sluice")
    """
    settings = settings or Settings.from_env()
    share_redis_clients()
    keep_control_alive()
    app = make_celery(
        settings,
        include=["tasks.generate"],
        # A worker dying mid-stream must not lose the job: ack only at the end,
        # and hand the message back if the process is lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Hundreds of greenlets ack at once: kombu's default pool of 10 Redis
        # connections runs dry, and the consumer then drops its connection
        # (and the messages it had prefetched) as if the broker were down.
        #
        # No ack emulation: kombu's Redis transport would copy each message into
        # its unacked hash before the task starts (a round trip on every job's
        # way to its worker) and delete it after, to hand back after the
        # visibility timeout what a dead worker took.  Sluice re-runs such jobs
        # itself, sooner: a job taken and never leased waits in the unstarted
        # index (re-sent after unstarted_grace_s), a leased one has a lease
        # that runs out (re-run by the reaper); see workers/reaper.py.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "max_connections": settings.worker_concurrency + 50,
                                  "ack_emulation": False},
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        # Streams may run for minutes: give warm shutdown time to let them end.
        worker_soft_shutdown_timeout=float(settings.job_timeout_s),
        worker_enable_soft_shutdown_on_idle=False,
        worker_send_task_events=settings.task_events,
        # When Redis is lost, keep trying to get it back (never exit), every
        # second or two rather than kombu's back-off of up to 30 s.
        worker_consumer="workers.celery_app:Consumer",
        broker_connection_max_retries=None,
    )
    repair_gevent_patching()
    app.sluice = WorkerRuntime(settings, app)
    if not settings.remote_control:
        make_control_read_only()
    return app


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, reconnecting to a broker that came back within about 2 s.

    Celery asks kombu to retry with its default back-off (2, 4, 6 … up to
    30 s between tries), so after an outage of a minute the worker would
    take jobs again only up to 30 s after Redis returned.
    """

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=0.5, interval_step=0.5, interval_max=2)
        return super().ensure_connected(conn)


def repair_gevent_patching() -> None:
    """Give kombu the cooperative ``sleep`` that gevent's patching missed.

    ``celery worker -P gevent`` patches the standard library after importing
    celery, and the patching itself (it walks existing objects, among them
    celery's lazy proxies) imports ``kombu.utils.functional`` before ``time``
    is patched.  kombu then sleeps with the blocking ``time.sleep``, and each
    pause of the broker reconnect back-off froze the whole worker process —
    its streams, lease renewals and reaper — for seconds at a time.
    """
    from gevent import monkey

    if not monkey.is_module_patched("time"):
        return
    from kombu.utils import functional

    if functional.sleep is monkey.get_original("time", "sleep"):  # type: ignore[attr-defined]
        functional.sleep = time.sleep  # type: ignore[attr-defined]  # gevent's, now


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


def announce_queues(rt: WorkerRuntime, queues: list[str]) -> None:
    """Tell the front ends which queues this process consumes, every heartbeat; never returns.

    Warns when a model of the providers config runs on a queue this worker
    does not consume and no other worker announced (the front end's /readyz
    says so too).
    """
    import gevent

    consumers = QueueConsumers(rt.redis)
    period_s = rt.settings.queue_heartbeat_s
    warned: set[str] = set()
    first = True
    while True:
        try:
            consumers.announce(queues, 3 * period_s)
            # The first round only announces: other workers may not have yet.
            gaps = {} if first else unserved(rt.config.queues(), consumers.live())
            first = False
            for queue, models in gaps.items():
                if queue not in warned:
                    log.warning("no worker consumes queue %r: jobs for %s wait there "
                                "(start one with -Q %s)", queue, ", ".join(models), queue)
                    warned.add(queue)
        except redis.RedisError as e:
            log.warning("announcing queues %s failed: %s", queues, e)
        gevent.sleep(period_s)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_housekeeping(sender: object, **_: object) -> None:
    import gevent

    from tasks.generate import keep_leases
    from workers.reaper import listen_for_cancels, reap_forever

    rt: WorkerRuntime = sender.app.sluice  # type: ignore[attr-defined]
    rt.warm()
    metrics.serve(rt.settings.metrics_port, lambda: len(rt.attempts), rt.router,
                  host=rt.settings.host)
    queues = sorted(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)  # type: ignore[attr-defined]
    gevent.spawn(announce_queues, rt, queues)
    gevent.spawn(keep_leases, rt)
    gevent.spawn(reap_forever, rt)
    gevent.spawn(listen_for_cancels, rt)
