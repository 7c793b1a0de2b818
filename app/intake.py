"""Intake: turns an authenticated request into an admitted, stored and enqueued job."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from app.admission import Admission
from app.apikeys import KeyInfo
from tasks.frames import FrameCharge
from tasks.jobs import JobSpec, JobStore
from tasks.limits import Limits
from tasks.queue import Dispatcher, StartBatcher, TaskMessages


@dataclass(frozen=True)
class Submitted:
    """A job that was admitted and stored."""

    job_id: str
    #: Jobs ahead of it: its session's earlier jobs, or the depth of its queue.
    position: int
    #: The key's figures after the reservation; ``None`` when admitted without Redis.
    limits: Limits | None
    spec: JobSpec
    #: Already on its queue: the job-creation script pushed its broker message.
    enqueued: bool = False


class Intake:
    """Admits, stores and enqueues jobs for every socket and request of a front end.

    With ``messages`` (the broker is Sluice's Redis), a job that may start now
    is stored and enqueued by one script; otherwise :meth:`start` sends it.
    Under gevent (gunicorn's workers), jobs without a chat session go through
    a :class:`~tasks.queue.StartBatcher`: each is admitted, stored and
    enqueued in one round trip, and those submitted together share one script
    call and one broker message.

    Example::

        intake = Intake(admission, jobs, dispatcher, TaskMessages(celery))
        submitted = intake.submit(key, spec, max_tokens_given=True)
    """

    def __init__(self, admission: Admission, jobs: JobStore, dispatcher: Dispatcher,
                 messages: TaskMessages | None = None) -> None:
        self.admission = admission
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.messages = messages
        self.batcher = StartBatcher(jobs, messages) if messages and _gevent() else None

    def submit(self, key: KeyInfo, spec: JobSpec, *, max_tokens_given: bool = True,
               frame: FrameCharge | None = None) -> Submitted:
        """Admit, store and, if it may start, enqueue a job; the caller then :meth:`start`\\ s it.

        Admission comes before anything is stored or enqueued: a refused
        request costs no worker time and leaves nothing behind.

        :param frame: the WebSocket frame that asked, metered in admission's own call.
        :raises app.admission.AdmissionRejectedError: the request is refused.
        :raises tasks.frames.FrameBudgetExceededError: ``frame`` is over the key's frame budget.
        :raises Exception: storing the job failed after admission (Redis, or anything
            else); the reservation and slot are refunded first.
        """
        if self.batcher is not None and not spec.session:
            return self._submit_batched(key, spec, max_tokens_given, frame)
        admitted = self.admission.admit(key, spec, max_tokens_given=max_tokens_given,
                                        frame=frame)
        spec = admitted.spec
        try:
            message = self.messages.render(admitted.job_id, spec.queue) if self.messages \
                else ""
            _, position = self.jobs.create(spec, admitted.job_id, message=message)
        except BaseException:
            # Whatever failed, nothing will ever settle this job: give its slot back now.
            self.dispatcher.refund(admitted.job_id)
            raise
        enqueued = bool(message) and (not spec.session or position == 0)
        return Submitted(admitted.job_id, position, admitted.limits, spec, enqueued)

    def _submit_batched(self, key: KeyInfo, spec: JobSpec, max_tokens_given: bool,
                        frame: FrameCharge | None) -> Submitted:
        """Admit, store and enqueue in one call that jobs submitted together share."""
        assert self.batcher is not None
        pending = self.admission.prepare(key, spec, max_tokens_given=max_tokens_given,
                                         frame=frame)
        try:
            position, reply = self.batcher.create(pending.job_id, pending.spec, pending.call)
        except BaseException as e:
            # Whether or not it was admitted and stored, nothing will settle it.
            self.dispatcher.refund(pending.job_id)
            if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
                raise self.admission.unreachable() from e
            raise
        admitted = self.admission.conclude(pending, reply)  # a refusal stored nothing
        return Submitted(admitted.job_id, position, admitted.limits, admitted.spec, True)

    def start(self, submitted: Submitted) -> None:
        """Enqueue a stored job, unless it is on its queue already or waits behind its session.

        A job the broker refuses ends with an ``error`` event in its log.
        """
        spec = submitted.spec
        if submitted.enqueued:
            return
        if not spec.session or submitted.position == 0:
            self.dispatcher.enqueue(submitted.job_id, spec.queue, spec.owner, spec.session)


def _gevent() -> bool:
    """Whether this process runs under gevent (its front ends do), so a batcher may wait."""
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))
