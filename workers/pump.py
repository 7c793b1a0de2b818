"""The bulk pump's place on the workers: one process pumps, the others stand by.

Every worker process runs :func:`pump_forever`.  The process holding the
lock (``sluice:pump``, a token with a TTL it renews) runs the
:class:`tasks.pump.Pump`; the others try to take the lock when it lapses, so
the pump survives any process: a killed pump is replaced within one lock
TTL.  A worker that becomes ready takes the lock over, so a deploy moves the
pump to the new workers at once (two pumps may overlap for one renewal
period; every change they make is one idempotent Lua call).

The pump is woken on ``sluice:bulk:wake``: by a front end when a bulk is
submitted or cancelled, and by the worker that ran a bulk item's task when
the task returns (:func:`announce_end`).  Without wake-ups it still sweeps
once a second.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import gevent
import redis
from celery import Celery, Task
from celery.signals import task_postrun, worker_ready
from gevent.queue import Empty, Queue

from tasks import keys
from tasks.admission import Admission
from tasks.bulk import BulkEngine
from tasks.pump import Pump
from tasks.queue import TASK_NAME

if TYPE_CHECKING:
    from workers.celery_app import WorkerRuntime

log = logging.getLogger(__name__)

# Renew the pump's lock if this process still holds it.
# KEYS[1] the lock. ARGV[1] token, ARGV[2] TTL ms.  Returns 1 if renewed, 0 if lost.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class PumpLock:
    """Says which worker process pumps.

    Example::

        lock = PumpLock(client, ttl_ms=10_000)
        lock.take()            # a new worker takes over
        while lock.renew(): ...
    """

    def __init__(self, client: redis.Redis, ttl_ms: int) -> None:
        self.redis = client
        self.ttl_ms = ttl_ms
        self.token = uuid.uuid4().hex
        self._renew = client.register_script(RENEW)

    def take(self) -> bool:
        """Take the lock whoever holds it."""
        return bool(self.redis.set(keys.PUMP, self.token, px=self.ttl_ms))

    def acquire(self) -> bool:
        """Take the lock if nobody holds it."""
        return bool(self.redis.set(keys.PUMP, self.token, px=self.ttl_ms, nx=True))

    def renew(self) -> bool:
        """Keep the lock for another TTL; False when another process holds it now."""
        return bool(self._renew(keys=[keys.PUMP], args=[self.token, self.ttl_ms]))


class Wakeups:
    """The pump's wake-ups, received on one pub/sub connection in their own greenlet."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.queue: Queue[str] = Queue()
        self.listener = gevent.spawn(self._listen)

    def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.BULK_WAKE)
                for message in pubsub.listen():
                    self.queue.put(message["data"].decode())
            except redis.RedisError as e:
                log.warning("pump wake-ups: %s", e)
                gevent.sleep(1)
            finally:
                pubsub.close()

    def wait(self, timeout_s: float) -> list[str]:
        """Wait up to ``timeout_s`` for a wake-up; return the job ids of ended items."""
        try:
            first = self.queue.get(timeout=timeout_s)
        except Empty:
            return []
        got = [first]
        while not self.queue.empty():
            got.append(self.queue.get_nowait())
        return [g for g in got if g]


def pump_forever(rt: WorkerRuntime) -> None:
    """Pump while this process holds the lock; stand by while another does."""
    settings = rt.settings
    engine = BulkEngine(rt.redis, settings, Admission.from_settings(settings, rt.redis),
                        rt.jobs, rt.events)
    pump = Pump(settings, engine, rt.dispatcher)
    lock = PumpLock(rt.redis, ttl_ms=max(2000, settings.lease_ttl_s * 1000))
    wakeups = Wakeups(rt.redis)
    renew_s = lock.ttl_ms / 3000
    holding, renewed = False, 0.0
    ended: list[str] = []
    first = True
    while True:
        try:
            if not holding:
                holding = lock.take() if first else lock.acquire()
                first = False
                if holding:
                    log.info("this process pumps bulk items now")
                    renewed = _now()
                else:
                    wakeups.wait(lock.ttl_ms / 2000)
                    continue
            wait_s = pump.step(ended)
            if _now() - renewed >= renew_s:
                holding = lock.renew()
                renewed = _now()
                if not holding:
                    log.info("another process pumps bulk items now")
                    continue
            ended = wakeups.wait(min(wait_s, renew_s))
        except Exception:  # Redis or broker trouble must not end the loop
            log.exception("pump: this round failed; trying again")
            gevent.sleep(1)


def _now() -> float:
    return time.monotonic()


def announce_end(task: Task | None = None, args: Any = None, **_: Any) -> None:
    """Wake the pump when a bulk item's task returns (Celery's ``task_postrun``)."""
    if task is None or task.name != TASK_NAME or not args:
        return
    rt: WorkerRuntime = task.app.sluice
    info = task.request.delivery_info or {}
    if info.get("routing_key") != rt.settings.bulk_queue:
        return
    try:
        rt.redis.publish(keys.BULK_WAKE, args[0])
    except redis.RedisError as e:
        log.warning("could not wake the pump for job %s: %s", args[0], e)


def start_pump(sender: Any = None, **_: Any) -> None:
    """Run :func:`pump_forever` in this worker process (Celery's ``worker_ready``).

    Only a worker that consumes the bulk queue pumps: the pump's own work then
    runs where the bulk items run (a separate pool under ``nice``, or every worker).
    """
    rt: WorkerRuntime = sender.app.sluice
    consumed = set(sender.app.amqp.queues.consume_from or ())
    if consumed and rt.settings.bulk_queue not in consumed:
        return
    gevent.spawn(pump_forever, rt)


def install_pump(app: Celery) -> None:
    """Make the worker processes of ``app`` run the pump and wake it when items end.

    Also makes them take bulk messages only when no interactive one waits.

    Example::

        app = create_celery()
        install_pump(app)
    """
    # Kombu's Redis transport rotates the queues it BRPOPs from (the queue it
    # just took a message from goes last), so interactive and bulk messages
    # would alternate; "priority" always lists them in -Q order: a bulk item
    # is taken only when no interactive job waits.
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         "queue_order_strategy": "priority"}
    worker_ready.connect(start_pump, weak=False, dispatch_uid="sluice.pump")
    task_postrun.connect(announce_end, weak=False, dispatch_uid="sluice.pump.end")
