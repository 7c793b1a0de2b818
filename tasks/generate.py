"""The generation task: run one job against the provider and log its events."""

from __future__ import annotations

import logging
import time
import uuid
from itertools import pairwise
from typing import Any

import gevent
import redis
from celery import Task, shared_task
from gevent.event import Event

from tasks.events import Appended, LeaseLostError
from tasks.jobs import FINAL, Job
from tasks.queue import TASK_NAME
from tasks.runtime import Finish, ProviderError, Report, Runtime

log = logging.getLogger(__name__)


class AttemptAbandonedError(RuntimeError):
    """Redis stayed out of reach; the job is left to be re-run when its lease runs out."""


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,  # type: ignore[untyped-decorator]
             ignore_result=True, max_retries=None)
def generate(self: Task, job_id: str) -> None:
    """Run job ``job_id``: stream the provider's answer into the job's event log.

    Takes only the id, so brokers, logs and Flower never see prompts.  A copy
    delivered while another attempt holds the job's lease retries later
    instead of generating beside it.  If the attempt fails unexpectedly, its
    lease is kept until it runs out, so the reaper re-runs the job.
    """
    rt: Runtime = self.app.sluice
    job = rt.jobs.get(job_id)
    if job is None:
        log.warning("job %s expired before it ran", job_id)
        return
    if job.status in FINAL:
        _start_next(rt, job)
        return
    token = uuid.uuid4().hex
    held = rt.jobs.take_lease(job_id, token, rt.settings.lease_ttl_s * 1000)
    if held == 0:
        raise self.retry(countdown=rt.settings.lease_ttl_s)
    if held == 1:
        ended = Attempt(rt, job, token).run()
        rt.jobs.release_lease(job_id, token)
        if not ended:
            return  # another attempt owns the job now, and will end it
    _start_next(rt, job)


def _start_next(rt: Runtime, job: Job) -> None:
    """Start the next job of an ended job's chat session (idempotent)."""
    if job.spec.session:
        rt.dispatcher.start_next(job.spec.owner, job.spec.session, job.job_id)


class Attempt:
    """One attempt at a job, holding its lease.

    The provider stream is read in one greenlet and written to Redis by
    another, so a slow Redis round trip never delays reading; text that piles
    up while a write is in flight goes out as one event.  A cancel kills the
    reader wherever it waits, which closes the provider's stream at once.
    Every append names the seq it expects, so one retried after a lost reply
    is not logged twice.
    """

    def __init__(self, rt: Runtime, job: Job, lease_token: str) -> None:
        self.rt = rt
        self.job = job
        self.token = lease_token
        self.pending: list[str] = []
        self.wakeup = Event()
        self.stop = Event()        # cancel seen, lease lost, or reading ended
        self.cancelled = False
        self.lease_lost = False
        self.abandoned = False
        self.next_seq = 0
        self.reader: gevent.Greenlet | None = None
        self.finish: Finish | None = None
        self.error: ProviderError | None = None
        self.times: list[float] = []  # when each piece arrived

    def run(self) -> bool:
        """Generate, then log ``done`` or ``error``.

        :return: True if this attempt ended the job, False if another took it over.
        :raises AttemptAbandonedError: Redis stayed unreachable for a lease period.
        """
        jid = self.job.job_id
        now_ms = int(time.time() * 1000)
        attempt, started_ms, self.next_seq = self.rt.jobs.mark_running(jid, now_ms)
        if self.next_seq > 0 or attempt > 1:
            self._emit("restart", {"attempt": attempt})
        if self.job.cancel_requested:
            self._finish_cancelled()
            self._settle(0, 0)
            return True
        t_start = time.monotonic()
        heartbeat = gevent.spawn(self._heartbeat)
        writer = gevent.spawn(self._write_tokens)
        self.reader = gevent.spawn(self._read)
        self.rt.attempts[jid] = self
        try:
            self.reader.join()
        finally:
            self.stop.set()
            self.wakeup.set()
            self.reader.kill()
            writer.join()
            heartbeat.kill()
            self.rt.attempts.pop(jid, None)
        if self.abandoned:
            raise AttemptAbandonedError(f"job {jid}: Redis unreachable; left for a re-run")
        try:
            if not self.lease_lost:
                self.rt.record(self._end(attempt, started_ms, t_start))
                return True
        except LeaseLostError:
            pass
        log.warning("job %s: lease lost, another attempt owns it", jid)
        self.rt.record(Report("lost", self.rt.provider.name))
        return False

    def _end(self, attempt: int, started_ms: int, t_start: float) -> Report:
        deployment = self.rt.provider.name
        finish, error, times = self.finish, self.error, self.times
        if not self.cancelled and error is None and finish is not None:
            return self._finish_done(finish, attempt, started_ms, t_start, times, deployment)
        if self.cancelled:
            self._finish_cancelled()
            report = Report("cancelled", deployment)
        else:
            error = error or ProviderError("provider_stream_broken", "the stream ended early")
            self._emit("error", {"code": error.code, "message": error.message}, status="error")
            report = Report("error", deployment, error_code=error.code)
        # Once the provider streamed, it billed the prompt (the admission count
        # stands in for it); before that, everything is refunded.
        if times:
            self._settle(None, len(times))
        else:
            self._settle(0, 0)
        return report

    def _finish_done(self, finish: Finish, attempt: int, started_ms: int, t_start: float,
                     times: list[float], deployment: str) -> Report:
        usage = finish.usage
        n = usage.completion_tokens if usage else len(times)
        first, last = (times[0], times[-1]) if times else (None, t_start)
        gaps = sorted(b - a for a, b in pairwise(times))
        queue_wait_ms = max(0, started_ms - self.job.created_ms)
        m: dict[str, Any] = {
            "queue_wait_ms": queue_wait_ms,
            "provider_ttft_ms": _ms(first - t_start) if first is not None else None,
            "tpot_ms": _ms((last - first) / (n - 1)) if first is not None and n > 1 else None,
            "itl_p50_ms": _ms(gaps[len(gaps) // 2]) if gaps else None,
            "itl_max_ms": _ms(gaps[-1]) if gaps else None,
            "generation_ms": _ms(last - t_start),
            "e2e_ms": max(0, int(time.time() * 1000) - self.job.created_ms),
            "client_ttft_ms": self.rt.jobs.client_ttft_ms(self.job.job_id),
            "deployment": deployment,
            "attempts": attempt,
        }
        self._emit("done", {
            "finish_reason": finish.reason,
            "usage": {"prompt_tokens": usage.prompt_tokens if usage else None,
                      "completion_tokens": n},
            "metrics": m,
        }, status="done")
        self._settle(usage.prompt_tokens if usage else None, n)
        return Report(
            "done", deployment, queue_wait_s=queue_wait_ms / 1000, e2e_s=m["e2e_ms"] / 1000,
            provider_ttft_s=first - t_start if first is not None else None,
            tpot_s=(last - first) / (n - 1) if first is not None and n > 1 else None,
            prompt_tokens=usage.prompt_tokens if usage else 0, completion_tokens=n)

    def _read(self) -> None:
        spec = self.job.spec
        limit_s = self.rt.settings.job_timeout_s
        too_long = ProviderError("timeout", f"the job ran longer than {limit_s} s")
        try:
            with gevent.Timeout(limit_s, too_long), self.rt.provider.stream(
                    spec.model, spec.messages, spec.max_tokens,
                    temperature=spec.temperature, seed=spec.seed) as stream:
                for piece in stream:
                    if isinstance(piece, Finish):
                        self.finish = piece
                        return
                    self.times.append(time.monotonic())
                    self.pending.append(piece)
                    self.wakeup.set()
        except ProviderError as e:
            self.error = e

    def halt(self, *, cancelled: bool = False, lease_lost: bool = False,
             abandoned: bool = False) -> None:
        """Stop generating now: close the provider stream wherever the reader is waiting."""
        self.cancelled = self.cancelled or cancelled
        self.lease_lost = self.lease_lost or lease_lost
        self.abandoned = self.abandoned or abandoned
        self.stop.set()
        self.wakeup.set()
        if self.reader is not None:
            self.reader.kill(block=False)

    def _write_tokens(self) -> None:
        # Greenlets switch only on I/O, so checking ``pending`` then waiting
        # cannot miss a wake-up.
        while True:
            if self.pending:
                text = "".join(self.pending)
                self.pending.clear()
                try:
                    appended = self._emit("token", {"text": text})
                except LeaseLostError:
                    self.halt(lease_lost=True)
                    return
                except AttemptAbandonedError:
                    self.halt(abandoned=True)
                    return
                if appended.cancel_requested:
                    self.halt(cancelled=True)
                    return
            elif self.stop.is_set():
                return
            else:
                self.wakeup.clear()
                self.wakeup.wait()

    def _heartbeat(self) -> None:
        ttl_s = self.rt.settings.lease_ttl_s
        slot_ms = self.rt.settings.slot_ttl_s * 1000
        while not self.stop.is_set():
            gevent.sleep(ttl_s / 3)
            try:
                held = self.rt.jobs.take_lease(self.job.job_id, self.token, ttl_s * 1000)
                if held != 1:
                    self.halt(lease_lost=True)
                elif self.rt.jobs.cancel_requested(self.job.job_id):
                    self.halt(cancelled=True)
                self.rt.budget.touch(self.job.job_id, slot_ms)
            except redis.RedisError as e:
                # The writer decides when Redis has been gone too long.
                log.warning("job %s: heartbeat failed: %s", self.job.job_id, e)

    def _settle(self, prompt_tokens: int | None, completion_tokens: int) -> None:
        # After the final event: a worker dying in between leaves the slot to
        # expire and the reservation unrefunded (the safe side).
        try:
            self.rt.budget.settle(self.job.job_id, prompt_tokens, completion_tokens)
        except redis.RedisError as e:
            log.warning("job %s: could not settle its budget: %s", self.job.job_id, e)

    def _finish_cancelled(self) -> None:
        self._emit("error", {"code": "cancelled", "message": "the job was cancelled"},
                   status="cancelled")

    def _emit(self, kind: str, body: dict[str, Any], status: str = "") -> Appended:
        """Append an event, retrying through Redis errors for up to one lease period.

        :raises LeaseLostError: another attempt owns the job.
        :raises AttemptAbandonedError: Redis stayed unreachable.
        """
        deadline = time.monotonic() + self.rt.settings.lease_ttl_s
        while True:
            try:
                appended: Appended = self.rt.appender.append(
                    self.job.job_id, kind, body, lease_token=self.token, status=status,
                    expect_seq=self.next_seq)
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    raise AttemptAbandonedError(str(e)) from e
                log.warning("job %s: append failed, retrying: %s", self.job.job_id, e)
                gevent.sleep(0.2)
                continue
            self.next_seq = appended.seq + 1
            return appended


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
