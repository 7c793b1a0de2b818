"""Worker housekeeping: re-enqueue jobs whose worker died, and stop cancelled ones at once.

A dead worker's jobs: their lease ran out without being released.

Celery's Redis transport also redelivers unacked messages, but only after the
visibility timeout, which must exceed the longest job.  The lease notices a
dead worker within ``lease_ttl_s``; every worker process runs a reaper, and a
Lua claim makes sure each orphan is re-enqueued by one of them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent
import redis

from tasks import keys
from tasks.jobs import FINAL
from workers import metrics

if TYPE_CHECKING:
    from workers.celery_app import WorkerRuntime

log = logging.getLogger(__name__)


def reap_forever(rt: WorkerRuntime) -> None:
    """Every half lease, re-enqueue the jobs whose lease ran out and sample the queue depth."""
    period_s = rt.settings.lease_ttl_s / 2
    while True:
        gevent.sleep(period_s)
        try:
            reap_once(rt)
            metrics.QUEUE_DEPTH.labels(rt.settings.queue).set(rt.redis.llen(rt.settings.queue))
        except Exception:  # Redis or broker trouble must not end the loop
            log.exception("reaper: this round failed; trying again")


def reap_once(rt: WorkerRuntime) -> list[str]:
    """Claim and re-enqueue orphaned jobs; return their ids."""
    orphans = rt.jobs.claim_orphans(grace_ms=rt.settings.lease_ttl_s * 3000)
    for job_id in orphans:
        queue = rt.jobs.queue_of(job_id)
        if queue is None or rt.jobs.status(job_id) in FINAL:
            rt.jobs.forget_running(job_id)
            continue
        log.warning("job %s lost its worker; re-enqueueing it on %r", job_id, queue)
        rt.dispatcher.send(job_id, queue)
    return orphans


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
