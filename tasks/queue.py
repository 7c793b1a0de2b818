"""The generation queue: the one place a job is handed to the workers.

Every producer — the front end on submit, a worker starting the next job of a
chat session, the reaper re-running an orphan — goes through a
:class:`Dispatcher`, so the task name, the failure handling and the
session-advance path are written once.  Tasks take only a job id: brokers,
logs and Flower never see prompts.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import redis
from celery import Celery
from celery.app.amqp import AMQP
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr

from tasks.budget import Bill, Budget, ReserveCall
from tasks.coalesce import Coalescer, run_scripts
from tasks.config import Settings
from tasks.events import EventLog
from tasks.jobs import JOB_ID, JobSpec, JobStore

log = logging.getLogger(__name__)

#: The Celery name of the generation task.
TASK_NAME = "sluice.generate"


def make_celery(settings: Settings, **conf: Any) -> Celery:
    """A Celery app on Sluice's broker, configured as every producer and worker needs it.

    :param conf: further configuration (the workers add theirs).

    Example::

        celery = make_celery(Settings.from_env())    # a producer: it only sends tasks
    """
    app = Celery("sluice", broker=settings.broker)
    app.conf.update({
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # No task-sent events: they cost a producer an extra publish per job;
        # Flower still sees every task from the workers' own events.
        "task_send_sent_event": False,
        **conf,
    })
    return app


class TaskMessages:
    """Renders the broker message of :data:`TASK_NAME` for a job, without Celery.

    The message is byte for byte what ``send_task(TASK_NAME, args=[job_id],
    queue=queue)`` has kombu's Redis transport push onto the queue's list
    (Celery's task protocol 2, JSON body in base64), so the job-creation script
    can push it itself (:meth:`tasks.jobs.JobStore.create`): ``send_task`` cost
    a front end a quarter of its CPU per job.  ``tests/test_queue.py`` checks it
    against Celery's own message, field by field, for the pinned Celery version.

    Example::

        messages = TaskMessages(celery)
        if messages.inline(settings):
            jobs.create(spec, job_id, message=messages.render(job_id, spec.queue))
    """

    def __init__(self, celery: Celery) -> None:
        # What send_task would put there: the producer's node name and its app's oid.
        self.origin = json.dumps(anon_nodename())
        self.reply_to = json.dumps(str(celery.thread_oid))

    @staticmethod
    def inline(settings: Settings) -> bool:
        """Whether a Lua script on Sluice's Redis can enqueue: the broker is that same Redis."""
        return settings.broker == settings.redis_url and \
            urlparse(settings.broker).scheme in ("redis", "rediss")

    def render(self, job_ids: str | Sequence[str], queue: str) -> str:
        """The message that runs ``job_ids`` on ``queue``, as the queue's list holds it.

        One id gives ``send_task(TASK_NAME, args=[job_id])``'s message; several
        give ``args=[id1, id2, ...]`` (the task takes any number of ids).

        :raises ValueError: an id is not a job id (ids are written into the JSON as they are).
        """
        ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        if not ids or not all(JOB_ID.match(i) for i in ids):
            raise ValueError(f"not job ids: {job_ids!r}")
        task_id = str(uuid.uuid4())
        args = ", ".join(f'"{i}"' for i in ids)
        body = base64.b64encode(
            f'[[{args}], {{}}, {{"callbacks": null, "errbacks": null, "chain": null, '
            f'"chord": null}}]'.encode()).decode()
        # What Celery writes (its saferepr, cut at 1,024 characters); one id is the common case.
        argsrepr = f"['{ids[0]}']" if len(ids) == 1 else json.dumps(
            saferepr(ids, AMQP.argsrepr_maxsize))[1:-1]
        return (
            f'{{"body": "{body}", "content-encoding": "utf-8", '
            f'"content-type": "application/json", "headers": {{"lang": "py", '
            f'"task": "{TASK_NAME}", "id": "{task_id}", "shadow": null, "eta": null, '
            f'"expires": null, "group": null, "group_index": null, "retries": 0, '
            f'"timelimit": [null, null], "root_id": "{task_id}", "parent_id": null, '
            f'"argsrepr": "{argsrepr}", "kwargsrepr": "{{}}", "origin": {self.origin}, '
            f'"ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, '
            f'"stamps": {{}}}}, "properties": {{"correlation_id": "{task_id}", '
            f'"reply_to": {self.reply_to}, "delivery_mode": 2, "delivery_info": '
            f'{{"exchange": "", "routing_key": {json.dumps(queue)}}}, "priority": 0, '
            f'"body_encoding": "base64", "delivery_tag": "{uuid.uuid4()}"}}}}')


class StartBatcher:
    """Admits and stores the jobs a process submits, and pushes one broker message per batch.

    In the style of :class:`tasks.events.AppendBatcher`: the first job of an
    idle period goes out at once, in its own call (no added latency); jobs
    submitted while a call is in flight gather and go out together in the
    next one, as one :data:`tasks.jobs.ADMIT_MANY` call per queue whose
    message names them all (at most :attr:`MAX_BATCH`).  A job given with its
    admission is admitted in that call and stored only if admitted: a request
    reaches its queue in one round trip.  A worker runs each id of the message
    as its own attempt with its own lease, so a job's re-runs and settling
    are what they are for a message of one.  Jobs of a chat session do not
    come here (their order is the session's, see
    :meth:`tasks.jobs.JobStore.create`).

    Needs gevent (the front ends run under gunicorn's gevent workers).

    Example::

        batcher = StartBatcher(jobs, TaskMessages(celery))
        position, reply = batcher.create(job_id, spec, admission)  # stored and queued if admitted
    """

    #: Jobs per message: enough to make a burst cheap, few enough that the jobs
    #: of one message (which all run on the worker that takes it) spread over workers.
    MAX_BATCH = 32

    def __init__(self, jobs: JobStore, messages: TaskMessages, max_batch: int = MAX_BATCH
                 ) -> None:
        self.jobs = jobs
        self.messages = messages
        self.coalescer: Coalescer[tuple[str, JobSpec, ReserveCall | None]] = \
            Coalescer(self._run, max_batch)

    def create(self, job_id: str, spec: JobSpec, admission: ReserveCall | None = None
               ) -> tuple[int, Any]:
        """Admit (given ``admission``), store and enqueue job ``job_id`` (no chat session).

        :param admission: the job's admission (:meth:`tasks.budget.Budget.reserve_call`);
            the job is stored and enqueued only if it admits the job.
        :return: how many jobs waited in its queue, and the admission's reply
            (:meth:`tasks.budget.Budget.reservation` reads it; 0 without ``admission``).
        :raises redis.RedisError: the call failed (the job may or may not be stored).
        """
        if spec.session:
            raise ValueError("a chat session's job is created on its own")
        position, reply = self.coalescer.call((job_id, spec, admission),
                                              f"creating job {job_id}")
        return int(position), reply

    def _run(self, batch: list[tuple[str, JobSpec, ReserveCall | None]]
             ) -> list[tuple[int, Any]]:
        """One ADMIT_MANY call (one message) per queue; each job's reply is its queue's
        wait and its admission's reply."""
        by_queue: dict[str, list[tuple[str, JobSpec, ReserveCall | None]]] = {}
        for item in batch:
            by_queue.setdefault(item[1].queue, []).append(item)
        groups = list(by_queue.values())
        # Every call runs the same script: after NOSCRIPT none ran, and all run again.
        replies = run_scripts(self.jobs.redis, [self.jobs.create_many_call(
            group, self.messages.render([job_id for job_id, _, _ in group], group[0][1].queue))
            for group in groups])
        out: dict[str, tuple[int, Any]] = {}
        for group, reply in zip(groups, replies, strict=True):
            waiting, admissions = self.jobs.created_many(reply)
            for (job_id, _, _), admitted in zip(group, admissions, strict=True):
                out[job_id] = (waiting, admitted)
        return [out[job_id] for job_id, _, _ in batch]


class Dispatcher:
    """Enqueues jobs, and ends the ones that cannot be enqueued.

    Example::

        dispatcher = Dispatcher(celery, jobs, events, budget)
        dispatcher.enqueue(job_id, "sluice")
    """

    def __init__(self, celery: Celery, jobs: JobStore, events: EventLog, budget: Budget) -> None:
        self.celery = celery
        self.jobs = jobs
        self.events = events
        self.budget = budget

    def send(self, job_id: str, queue: str) -> None:
        """Put one message for ``job_id`` on ``queue``, and watch that some attempt starts it.

        The job enters the unstarted index first: should the message be lost
        (taken by a worker that dies before it leases the job, or this
        process dying before it sends), the reaper sends it again
        (:meth:`resend`).

        :raises Exception: whatever the broker (or Redis) raises when it cannot take it.
        """
        self.jobs.track_unstarted(job_id)
        self.celery.send_task(TASK_NAME, args=[job_id], queue=queue)

    def resend(self, job_id: str, queue: str) -> None:
        """Send one more message for a job the unstarted index holds (its back-off is kept).

        :raises Exception: whatever the broker raises when it cannot take it.
        """
        self.celery.send_task(TASK_NAME, args=[job_id], queue=queue)

    def enqueue(self, job_id: str, queue: str, owner: str = "", session: str | None = None
                ) -> bool:
        """Hand a stored job to the workers; a job the broker refuses ends with an error.

        A chat session's job that cannot be enqueued is taken off its session
        and the next one is tried, so the jobs behind it are not held up.

        :return: whether ``job_id`` itself was enqueued.
        """
        first = True
        while True:
            try:
                self.send(job_id, queue)
                return first
            except Exception as e:
                log.exception("could not enqueue job %s", job_id)
                self._fail(job_id, f"could not enqueue the job: {e}")
            if not session:
                return False
            nxt = self.jobs.advance_session(owner, session, job_id)
            queue_of_next = self.jobs.queue_of(nxt) if nxt else None
            if not nxt or not queue_of_next:
                return False
            job_id, queue, first = nxt, queue_of_next, False

    def start_next(self, owner: str, session: str, ended_id: str) -> None:
        """Take an ended job off its chat session and enqueue the next one, if any.

        Idempotent: a job that is no longer its session's head changes nothing.
        """
        nxt = self.jobs.advance_session(owner, session, ended_id)
        queue = self.jobs.queue_of(nxt) if nxt else None
        if nxt and queue:
            self.enqueue(nxt, queue, owner, session)

    def refund(self, job_id: str) -> None:
        """Give back an unstarted job's whole reservation and slot (no-op once settled)."""
        try:
            self.budget.settle(job_id, 0, 0)
        except redis.RedisError:
            log.warning("could not refund job %s; its slot expires on its own", job_id)

    def _fail(self, job_id: str, message: str) -> None:
        """End a job that never started with an error, refunding it in the same call."""
        body = {"code": "unavailable", "message": message}
        try:
            owner = self.jobs.owner_of(job_id)
            if owner is not None:
                self.events.append(job_id, "error", body, status="error",
                                   bill=Bill(owner, 0, 0, self.budget.usage_ttl_s))
                return
        except redis.RedisError:
            log.warning("could not log the failure of job %s", job_id)
        self.refund(job_id)  # the record is gone (or Redis is): settle without it
