"""Intake: turns an authenticated request into an admitted, stored and enqueued job."""

from __future__ import annotations

from dataclasses import dataclass

from app.admission import Admission
from app.apikeys import KeyInfo
from tasks.jobs import JobSpec, JobStore
from tasks.limits import Limits
from tasks.queue import Dispatcher


@dataclass(frozen=True)
class Submitted:
    """A job that was admitted and stored."""

    job_id: str
    #: Jobs ahead of it: its session's earlier jobs, or the depth of its queue.
    position: int
    #: The key's figures after the reservation; ``None`` when admitted without Redis.
    limits: Limits | None
    spec: JobSpec


class Intake:
    """Admits, stores and enqueues jobs for every socket and request of a front end.

    Example::

        intake = Intake(admission, jobs, dispatcher)
        submitted = intake.submit(key, spec, max_tokens_given=True)
    """

    def __init__(self, admission: Admission, jobs: JobStore, dispatcher: Dispatcher) -> None:
        self.admission = admission
        self.jobs = jobs
        self.dispatcher = dispatcher

    def submit(self, key: KeyInfo, spec: JobSpec, *, max_tokens_given: bool = True
               ) -> Submitted:
        """Admit and store a job; the caller then :meth:`start`\\ s it.

        Admission comes before anything is stored or enqueued: a refused
        request costs no worker time and leaves nothing behind.

        :raises app.admission.AdmissionRejectedError: the request is refused.
        :raises Exception: storing the job failed after admission (Redis, or anything
            else); the reservation and slot are refunded first.
        """
        admitted = self.admission.admit(key, spec, max_tokens_given=max_tokens_given)
        try:
            _, position = self.jobs.create(admitted.spec, admitted.job_id)
        except BaseException:
            # Whatever failed, nothing will ever settle this job: give its slot back now.
            self.dispatcher.refund(admitted.job_id)
            raise
        return Submitted(admitted.job_id, position, admitted.limits, admitted.spec)

    def start(self, submitted: Submitted) -> None:
        """Enqueue a stored job, unless it waits behind its chat session's earlier jobs.

        A job the broker refuses ends with an ``error`` event in its log.
        """
        spec = submitted.spec
        if not spec.session or submitted.position == 0:
            self.dispatcher.enqueue(submitted.job_id, spec.queue, spec.owner, spec.session)
