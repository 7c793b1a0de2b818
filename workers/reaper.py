"""Worker housekeeping: re-enqueue jobs whose worker died or never came; stop cancelled ones.

A dead worker's jobs: their lease ran out without being released.  Every
worker process renews the leases of its running jobs every third of a lease
(:func:`tasks.generate.keep_leases`) and runs a reaper that looks for leases
that ran out every sixth of a lease; a Lua claim makes sure each orphan is
re-enqueued by one reaper only.  With the default 3 s lease, a killed
worker's jobs restart about 3 s after the kill (README, "Reliability").

A job whose message was lost before any attempt leased it (taken by a
worker killed before the lease, lost between kombu's BRPOP and its unacked
bookkeeping, or never sent by a producer that died) has no lease to run out:
the unstarted index (:data:`tasks.keys.UNSTARTED`) holds every job sent and
not yet started, and the reaper sends again those older than
``unstarted_grace_s`` (:func:`resend_unstarted`), with any broker.

Sluice's workers take messages without kombu's ack emulation (see
:func:`workers.celery_app.create_celery`).  Another consumer of the queue
with kombu's defaults (an older worker during an upgrade, a script) keeps a
message it took in the Redis transport's unacked hash until it acks, to be
delivered again after the visibility timeout if it dies; by then the job
has been re-sent from the unstarted index, and the late copy does nothing.
kombu looks for such messages only when such a consumer's poll comes back
empty, so the reaper sweeps them itself (:func:`restore_unacked`), which
also keeps the hash from growing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import gevent
import redis
from kombu.exceptions import OperationalError

from tasks import keys
from tasks.jobs import FINAL
from workers import metrics

if TYPE_CHECKING:
    from workers.celery_app import WorkerRuntime

log = logging.getLogger(__name__)

#: How often a worker process samples the depth of its queue for metrics.
QUEUE_DEPTH_PERIOD_S = 5.0
#: How often, at most, a worker process looks for messages unacked past the visibility timeout.
RESTORE_PERIOD_S = 10.0
#: Messages put back per sweep.
RESTORE_BATCH = 100


def reap_forever(rt: WorkerRuntime) -> None:
    """Re-enqueue the jobs whose lease ran out, every ``reaper_period_s``; never returns.

    Also samples the queue depth and, now and then, puts back on their queues
    the messages left unacked past the visibility timeout.
    """
    restore_period_s = min(RESTORE_PERIOD_S, rt.settings.visibility_timeout_s / 2)
    # Only kombu's Redis transport has an unacked hash to sweep; AMQP brokers
    # hand back a dead consumer's messages themselves.
    redis_broker = urlparse(rt.settings.broker).scheme in ("redis", "rediss")
    next_sample = next_restore = 0.0
    while True:
        gevent.sleep(rt.settings.reaper_period_s)
        try:
            reap_once(rt)
            resend_unstarted(rt)
            refund_orphans(rt)
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + QUEUE_DEPTH_PERIOD_S
                metrics.QUEUE_DEPTH.labels(rt.settings.queue).set(queue_depth(rt))
            if redis_broker and time.monotonic() >= next_restore:
                next_restore = time.monotonic() + restore_period_s
                restore_unacked(rt)
        except (redis.RedisError, OperationalError) as e:  # an outage: say so, briefly
            log.warning("reaper: Redis unreachable, trying again: %s", e)
        except Exception:  # nothing must end the loop
            log.exception("reaper: this round failed; trying again")


def reap_once(rt: WorkerRuntime) -> list[str]:
    """Claim and re-enqueue orphaned jobs; return their ids.

    An orphan that has ended lost its worker after its last event but before
    its chat session moved on: the reaper moves the session on instead.
    """
    orphans = rt.jobs.claim_orphans(grace_ms=round(rt.settings.claim_grace_s * 1000))
    for job_id in orphans:
        job = rt.jobs.get(job_id)
        if job is None or job.status in FINAL:
            if job is not None and job.spec.session:
                rt.dispatcher.start_next(job.spec.owner, job.spec.session, job_id)
            rt.jobs.forget_running(job_id)
            continue
        log.warning("job %s lost its worker; re-enqueueing it on %r", job_id, job.spec.queue)
        rt.dispatcher.send(job_id, job.spec.queue)
    return orphans


def queue_depth(rt: WorkerRuntime) -> int:
    """How many messages wait on the process's generation queue, on whichever broker."""
    if rt.settings.broker == rt.settings.redis_url:
        return int(rt.redis.llen(rt.settings.queue))  # kombu's Redis transport: a list
    # A channel of its own: a passive declare of a missing queue closes its channel.
    with rt.dispatcher.celery.pool.acquire(block=True) as conn, conn.channel() as channel:
        try:
            return int(channel.queue_declare(rt.settings.queue, passive=True).message_count)
        except conn.channel_errors:  # not declared yet: nothing waits
            return 0


def resend_unstarted(rt: WorkerRuntime) -> list[str]:
    """Send again the jobs sent over ``unstarted_grace_s`` ago that no attempt started.

    A copy of a job that starts meanwhile does nothing; the claim makes one
    reaper send each, and backs off for jobs that wait long (see
    :data:`tasks.jobs.CLAIM_UNSTARTED`).  Returns the ids sent again.
    """
    claimed = rt.jobs.claim_unstarted(grace_ms=round(rt.settings.unstarted_grace_s * 1000))
    for job_id, queue in claimed:
        log.warning("job %s was sent but never started; sending it again on %r", job_id, queue)
        rt.dispatcher.resend(job_id, queue or rt.settings.queue)
    return [job_id for job_id, _ in claimed]


def refund_orphans(rt: WorkerRuntime) -> list[str]:
    """Refund the jobs admitted over ``unstarted_grace_s`` ago that were never stored.

    (Their front end died between admission and storing them: see
    :meth:`tasks.budget.Budget.refund_orphans`.)  Returns the ids refunded.
    """
    orphans = rt.budget.refund_orphans(round(rt.settings.unstarted_grace_s * 1000))
    for job_id in orphans:
        log.warning("job %s was admitted but never stored; its reservation is refunded", job_id)
    return orphans


def restore_unacked(rt: WorkerRuntime) -> None:
    """Put messages unacked for longer than the visibility timeout back on their queues.

    The sweep is kombu's own (a mutex makes one process do it at a time);
    each message goes back once, and the copy of a job that is running or
    has ended does nothing.
    """
    # A connection with kombu's ack emulation (the workers' own has none):
    # its channel's QoS is the one that knows the unacked hash.
    with rt.dispatcher.celery.connection_for_write(
            transport_options={"ack_emulation": True}) as conn:
        conn.default_channel.qos.restore_visible(num=RESTORE_BATCH, interval=1)


def listen_for_cancels(rt: WorkerRuntime) -> None:
    """Halt this process's attempt of every job whose cancel is announced."""
    while True:
        pubsub = rt.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.CANCELS)
            for message in pubsub.listen():
                attempt = rt.attempts.get(message["data"].decode())
                if attempt is not None:
                    attempt.halt(cancelled=True)
        except redis.RedisError as e:
            log.warning("cancel listener: %s", e)
            gevent.sleep(1)
        finally:
            pubsub.close()
