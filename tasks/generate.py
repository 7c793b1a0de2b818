"""The generation task: run one job against the provider deployments and log its events.

Failover lives here, on top of :mod:`tasks.routing`: a request that fails
before its first token (a connect error, a timeout, a 5xx or 429) is tried
again on the next deployment the router picks (a deployment this job already
tried only when no other may serve, after a doubling pause); when every
deployment cools down or is at its limits the job waits for the soonest, up
to ``max_wait_s``.  A stream that breaks after tokens were logged is never
continued elsewhere: the attempt logs ``restart`` and regenerates from the
start on a deployment it has not tried, so a client never sees two
generations spliced together.
"""

from __future__ import annotations

import logging
import time
import uuid
from itertools import pairwise
from typing import Any
from weakref import WeakKeyDictionary

import gevent
import redis
from celery import Task, shared_task
from gevent.event import Event
from gevent.lock import Semaphore

from tasks.budget import Bill
from tasks.events import Appended, Ending, LeaseLostError, new_slot
from tasks.jobs import Job
from tasks.queue import TASK_NAME
from tasks.routing import Outcome, Pick, estimate_tokens
from tasks.runtime import Finish, ProviderError, Report, Runtime

log = logging.getLogger(__name__)

#: Leases renewed per Redis call, so that one call never blocks Redis for long.
RENEW_BATCH = 200


class AttemptAbandonedError(RuntimeError):
    """Redis stayed out of reach; the job is left to be re-run when its lease runs out."""


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,  # type: ignore[untyped-decorator]
             ignore_result=True)
def generate(self: Task, *job_ids: str) -> None:
    """Run jobs ``job_ids``: stream the provider's answer into each job's event log.

    Takes only ids, so brokers, logs and Flower never see prompts.  A message
    names one job, or several that a front end submitted together
    (:class:`tasks.queue.StartBatcher`): each runs as its own attempt, in its
    own greenlet, with its own lease, and the task returns (and its message is
    acked) when all have ended.  Any number of copies of a message may arrive
    (a redelivery after a worker died, the reaper's re-send of one of its
    jobs): a copy finds each job ended, or leased by a live attempt, and does
    nothing for it (if that attempt dies, the reaper re-runs the job).  If an
    attempt fails unexpectedly, its lease is kept until it runs out, so the
    reaper re-runs the job.

    At most ``worker_concurrency`` attempts run in a process at once, whatever
    the number of ids per message: the others wait, unleased (still in the
    unstarted index), for a place.
    """
    rt: Runtime = self.app.sluice
    if len(job_ids) == 1:
        run_job(rt, job_ids[0])
        return
    runs = [gevent.spawn(run_job, rt, job_id) for job_id in job_ids]
    gevent.joinall(runs)
    for run in runs:  # the first failure is the task's (Celery logs it); the others are logged
        if run.exception is not None:
            for other in runs:
                if other is not run and other.exception is not None:
                    log.error("a job of the same message failed too: %r", other.exception)
            raise run.exception


#: Per worker process: how many attempts may run at once (worker_concurrency).
_slots: WeakKeyDictionary[Any, Semaphore] = WeakKeyDictionary()


def run_job(rt: Runtime, job_id: str) -> None:
    """Start an attempt at ``job_id`` and run it, unless it ended or another attempt holds it."""
    slots = _slots.get(rt)
    if slots is None:
        slots = _slots[rt] = Semaphore(rt.settings.worker_concurrency)
    with slots:
        _run_job(rt, job_id)


def _run_job(rt: Runtime, job_id: str) -> None:
    token = uuid.uuid4().hex
    # The lease and the attempt's first pick of a deployment in one call.
    start = rt.jobs.start(job_id, token, rt.settings.lease_ttl_s * 1000,
                          pick_args=rt.router.first_pick_args())
    if start.outcome == "missing":
        # Expired before it ran, or refused by admission in the call that stored the
        # others of its message (see tasks.jobs.ADMIT_MANY).
        log.info("job %s has no record; nothing to run", job_id)
    elif start.outcome == "held":
        log.info("job %s runs in another attempt; this copy does nothing", job_id)
    elif start.outcome == "ended":
        # Only the session may need a hand: its worker may have died between
        # the end and starting the next job (idempotent otherwise).
        log.info("job %s has ended; this copy does nothing", job_id)
        _start_next(rt, job_id, start.owner, start.session)
    elif start.job is not None and Attempt(rt, start.job, token, start.pick).run():
        # The call that ended a job without a session ended its lease too.
        if start.job.spec.session:
            _start_next(rt, job_id, start.job.spec.owner, start.job.spec.session)
            rt.jobs.release_lease(job_id, token)
    # else another attempt owns the job now, and will end it


def _start_next(rt: Runtime, job_id: str, owner: str, session: str | None) -> None:
    """Start the next job of an ended job's chat session (idempotent)."""
    if session:
        rt.dispatcher.start_next(owner, session, job_id)


def keep_leases(rt: Runtime) -> None:
    """Renew the leases of all the process's attempts, in one Redis call per period; never returns.

    An attempt whose lease is gone (it ran out while the process or Redis
    stalled, and may now run elsewhere) is halted, and so is one whose cancel
    was requested (a fallback for a missed cancel announcement).  Redis
    errors are logged and the loop goes on: meanwhile each attempt's own
    appends decide when to give up.
    """
    period_s = rt.settings.heartbeat_period_s
    ttl_ms = rt.settings.lease_ttl_s * 1000
    while True:
        gevent.sleep(period_s)
        attempts = list(rt.attempts.values())
        try:
            for i in range(0, len(attempts), RENEW_BATCH):
                batch = attempts[i:i + RENEW_BATCH]
                codes = rt.jobs.renew_leases([(a.job.job_id, a.token) for a in batch], ttl_ms)
                for attempt, code in zip(batch, codes, strict=True):
                    if code == 0:
                        attempt.halt(lease_lost=True)
                    elif code == 2:
                        attempt.halt(cancelled=True)
        except Exception as e:  # noqa: BLE001 - the loop must outlive any one failure
            log.warning("renewing %d leases failed: %r", len(attempts), e)


class Attempt:
    """One attempt at a job, holding its lease.

    The provider stream is read in one greenlet and written to Redis by
    another, so a slow Redis round trip never delays reading; text that piles
    up while a write is in flight goes out as one event.  A cancel kills the
    reader wherever it waits, which closes the provider's stream at once.
    Every append names the seq it expects, so one retried after a lost reply
    is not logged twice.
    """

    def __init__(self, rt: Runtime, job: Job, lease_token: str,
                 first_pick: list[Any] | None = None) -> None:
        self.rt = rt
        self.job = job
        self.token = lease_token
        #: PICK's reply for the first deployment, made with the lease (JobStore.start).
        self.first_pick = first_pick
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
        self.times: list[float] = []  # when each piece of the current run arrived
        self.logged = 0  # pieces of the current run written to the log
        self.t_start = 0.0  # when the current provider request was sent
        self.tried: list[str] = []  # deployments, in the order this attempt tried them
        self.failovers: list[tuple[str, str]] = []  # (deployment, error code) that failed
        self.streamed = False  # some deployment streamed text (its prompt is billed)
        self.restart_body: dict[str, Any] | None = None  # a restart for the writer to log
        # The request that streamed the answer, still counted on its deployment:
        # the call that ends the job ends it too (see _emit).
        self.unreleased: tuple[Pick, int, Outcome] | None = None

    def run(self) -> bool:
        """Generate, then log ``done`` or ``error`` and settle the job in the same call.

        While the attempt is registered in ``rt.attempts``, the process's
        :func:`keep_leases` renews its lease.

        :return: True if this attempt ended the job, False if another took it over.
        :raises AttemptAbandonedError: Redis stayed unreachable for a lease period.
        """
        jid = self.job.job_id
        self.next_seq = self.job.seq
        self.rt.attempts[jid] = self
        try:
            return self._run()
        except LeaseLostError:
            log.warning("job %s: lease lost, another attempt owns it", jid)
            self.rt.record(Report("lost", self.tried[-1] if self.tried else ""))
            return False
        finally:
            self.rt.attempts.pop(jid, None)
            if self.unreleased is not None:
                self._release_late(*self.unreleased)
            if self.first_pick is not None:
                self._release_first_pick(self.first_pick)

    def _release_first_pick(self, reply: list[Any]) -> None:
        """End the request the start counted on a deployment (``reply``), never sent."""
        self.first_pick = None
        route = self.rt.router.providers.route(self.job.spec.model)
        if route is None:
            return
        pick = self.rt.router.picked(route, reply)
        if pick.deployment is None:
            return
        spec = self.job.spec
        try:
            self.rt.router.release(pick, self.job.job_id,
                                   estimate_tokens(spec.messages, spec.max_tokens), Outcome(False))
        except redis.RedisError as e:
            log.warning("job %s: could not release deployment %s: %s", self.job.job_id,
                        pick.deployment, e)

    def _release_late(self, pick: Pick, need: int, outcome: Outcome) -> None:
        """End the successful request that no call ending the job ended.

        The job's end was not logged (lease lost, a log mismatch), or logged
        without it (a cancel logged after the answer), or Redis stayed out of
        reach (AttemptAbandonedError), when the end may have been made or not:
        hence ``once``, which changes nothing if the request was ended.  If this
        fails too, the in-flight entry drops out at its deadline or when the
        job's re-run picks a deployment (see tasks/routing.py PICK).
        """
        self.unreleased = None
        try:
            self.rt.router.release(pick, self.job.job_id, need, outcome, once=True)
        except redis.RedisError as e:
            log.warning("job %s: could not release deployment %s: %s", self.job.job_id,
                        pick.deployment, e)

    def _run(self) -> bool:
        jid, attempt = self.job.job_id, self.job.attempts
        if self.next_seq > 0 or attempt > 1:
            self._emit("restart", {"attempt": attempt})
        if self.job.cancel_requested:
            self._finish_cancelled(self._bill(0, 0))
            return True
        # Admission set the slot to outlive one attempt (two job timeouts): a
        # job that waited in a queue for half a timeout, or runs again, gets a
        # full term from now.  One that started at once needs no round trip.
        waited_ms = (self.job.started_ms or self.job.created_ms) - self.job.created_ms
        if attempt > 1 or waited_ms > self.rt.settings.job_timeout_s * 500:
            try:
                self.rt.budget.touch(jid, self.rt.settings.slot_ttl_s * 1000, self.job.spec.owner)
            except redis.RedisError as e:
                log.warning("job %s: could not renew its concurrency slot: %s", jid, e)
        self.t_start = t_start = time.monotonic()
        if not self.stop.is_set():  # a cancel or a lost lease may have come already
            writer = gevent.spawn(self._write_tokens)
            self.reader = gevent.spawn(self._read)
            try:
                self.reader.join()
            finally:
                self.stop.set()
                self.wakeup.set()
                self.reader.kill()
                writer.join()
        if self.abandoned:
            raise AttemptAbandonedError(f"job {jid}: Redis unreachable; left for a re-run")
        if self.lease_lost:
            raise LeaseLostError(jid)
        self.rt.record(self._end(attempt, t_start))
        return True

    def _end(self, attempt: int, t_start: float) -> Report:
        deployment = self.tried[-1] if self.tried else ""
        finish, error, times = self.finish, self.error, self.times
        if not self.cancelled and error is None and finish is not None:
            report = self._finish_done(finish, attempt, self.t_start, times, deployment)
            report.failovers = self.failovers
            return report
        # Once a provider streamed, it billed the prompt (the admission count
        # stands in for it) and the key pays for the text of the run it was
        # last sent (text a restart discarded is the gateway's loss); before
        # that, everything is refunded.
        bill = self._bill(None, self.logged) if self.streamed else self._bill(0, 0)
        if self.cancelled:
            self._finish_cancelled(bill)
            return Report("cancelled", deployment, failovers=self.failovers)
        error = error or ProviderError("provider_stream_broken", "the stream ended early")
        self._emit("error", {"code": error.code, "message": error.message, "tried": self.tried},
                   status="error", bill=bill)
        return Report("error", deployment, error_code=error.code, failovers=self.failovers)

    def _finish_done(self, finish: Finish, attempt: int, t_start: float,
                     times: list[float], deployment: str) -> Report:
        usage = finish.usage
        n = usage.completion_tokens if usage else len(times)
        first, last = (times[0], times[-1]) if times else (None, t_start)
        gaps = sorted(b - a for a, b in pairwise(times))
        slot = new_slot()
        # Both instants are Redis time: the clamp only guards against Redis's clock stepping.
        queue_wait_ms = max(0, (self.job.started_ms or self.job.created_ms) - self.job.created_ms)
        m: dict[str, Any] = {
            "queue_wait_ms": queue_wait_ms,
            "provider_ttft_ms": _ms(first - t_start) if first is not None else None,
            "tpot_ms": _ms((last - first) / (n - 1)) if first is not None and n > 1 else None,
            "itl_p50_ms": _ms(gaps[len(gaps) // 2]) if gaps else None,
            "itl_max_ms": _ms(gaps[-1]) if gaps else None,
            "generation_ms": _ms(last - t_start),
            "e2e_ms": max(0, int(time.time() * 1000) - self.job.created_ms),
            "client_ttft_ms": slot,  # FINISH fills in what the front end recorded
            "deployment": deployment,
            "attempts": attempt,
            "tried": list(self.tried),
        }
        self._emit("done", {
            "finish_reason": finish.reason,
            "usage": {"prompt_tokens": usage.prompt_tokens if usage else None,
                      "completion_tokens": n},
            "metrics": m,
        }, status="done", bill=self._bill(usage.prompt_tokens if usage else None, n),
            client_ttft_slot=slot)
        return Report(
            "done", deployment, queue_wait_s=queue_wait_ms / 1000, e2e_s=m["e2e_ms"] / 1000,
            provider_ttft_s=first - t_start if first is not None else None,
            tpot_s=(last - first) / (n - 1) if first is not None and n > 1 else None,
            prompt_tokens=usage.prompt_tokens if usage else 0, completion_tokens=n)

    def _read(self) -> None:
        limit_s = self.rt.settings.job_timeout_s
        too_long = ProviderError("timeout", f"the job ran longer than {limit_s} s")
        try:
            with gevent.Timeout(limit_s, too_long):
                self._generate()
        except ProviderError as e:
            self.error = e
        except redis.RedisError as e:
            # Routing needs Redis; so does logging the error, which retries until
            # the lease runs out and the job is left for a re-run.
            self.error = ProviderError("unavailable", f"could not route the job: {e}")

    def _generate(self) -> None:
        """Stream from deployment after deployment until one finishes or failover gives up.

        :raises ProviderError: the last failure, or why no deployment may serve.
        """
        spec, router = self.job.spec, self.rt.router
        gateway = router.providers.gateway
        route = router.providers.route(spec.model)
        if route is None:
            raise ProviderError("model_not_found", f"no deployment serves model {spec.model!r}")
        need = estimate_tokens(spec.messages, spec.max_tokens)
        waited_s, backoff_s = 0.0, gateway.backoff_s
        last: ProviderError | None = None
        while True:
            if self.first_pick is not None:  # made with the lease
                pick = router.picked(route, self.first_pick)
                self.first_pick = None
            else:
                # Text already logged may only be regenerated by another deployment.
                pick = router.pick(route, self.job.job_id, need, self.tried,
                                   untried_only=bool(self.times))
            if pick.deployment is None:
                if self.times or waited_s + pick.wait_s > gateway.max_wait_s:
                    raise last or ProviderError(
                        "provider_unavailable", f"no deployment of model {spec.model!r} may "
                        f"serve now (cooling down or at its limits) for {pick.wait_s:.1f} s")
                gevent.sleep(pick.wait_s)
                waited_s += pick.wait_s
                continue
            if pick.deployment in self.tried:
                gevent.sleep(backoff_s)  # still counted in flight: it is this job's turn
                backoff_s *= 2
            if self.times:
                self._restart(pick.deployment)
            self.tried.append(pick.deployment)
            try:
                self._stream(pick, need)
                return
            except ProviderError as e:
                log.warning("job %s: deployment %s failed (%s)%s", self.job.job_id,
                            pick.deployment, e.code, "" if e.failover else "; no failover")
                if not e.failover or len(self.tried) >= gateway.max_attempts:
                    raise
                self.failovers.append((pick.deployment, e.code))
                last = e

    def _stream(self, pick: Pick, need: int) -> None:
        """One provider request; releases its count on the deployment however it ends."""
        spec = self.job.spec
        assert pick.deployment is not None
        outcome: Outcome | None = None
        self.t_start = time.monotonic()
        try:
            with self.rt.providers.stream(pick.deployment, pick.upstream_model, spec.messages,
                                          spec.max_tokens, temperature=spec.temperature,
                                          seed=spec.seed) as stream:
                for piece in stream:
                    if isinstance(piece, Finish):
                        self.finish = piece
                        used = piece.usage.prompt_tokens + piece.usage.completion_tokens \
                            if piece.usage else need
                        outcome = Outcome(True, used, self._ttft(), remaining_tokens=
                                          piece.remaining_tokens, reset_s=piece.reset_s)
                        return
                    self.times.append(time.monotonic())
                    self.streamed = True
                    self.pending.append(piece)
                    self.wakeup.set()
        except ProviderError as e:
            outcome = Outcome(False, need if self.times else 0, self._ttft(), failed=e.failover,
                              retry_after_s=e.retry_after_s)
            raise
        finally:
            if outcome is None:  # killed: neither a success nor the deployment's failure
                outcome = Outcome(False, need if self.times else 0, self._ttft())
            if outcome.ok:
                # Ended by the call that ends the job, or else by run() (_release_late).
                self.unreleased = (pick, need, outcome)
            else:
                # Also on a kill (cancel, lost lease, job timeout): never leak the in-flight count.
                try:
                    self.rt.router.release(pick, self.job.job_id, need, outcome)
                except redis.RedisError as e:
                    log.warning("job %s: could not release deployment %s: %s", self.job.job_id,
                                pick.deployment, e)

    def _ttft(self) -> float | None:
        return self.times[0] - self.t_start if self.times else None

    def _restart(self, deployment: str) -> None:
        """Drop the broken run's text: the writer logs ``restart`` before any text of the next."""
        self.pending.clear()
        self.times = []
        self.restart_body = {"attempt": self.job.attempts, "reason": "failover",
                             "deployment": deployment}
        self.wakeup.set()

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
            if self.restart_body is not None:
                body, self.restart_body = self.restart_body, None
                try:
                    self._emit("restart", body)
                    self.logged = 0
                except LeaseLostError:
                    self.halt(lease_lost=True)
                    return
                except AttemptAbandonedError:
                    self.halt(abandoned=True)
                    return
            elif self.pending:
                pieces = len(self.pending)
                text = "".join(self.pending)
                self.pending.clear()
                try:
                    appended = self._emit("token", {"text": text})
                    self.logged += pieces
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

    def _bill(self, prompt_tokens: int | None, completion_tokens: int) -> Bill:
        return Bill(self.job.spec.owner, prompt_tokens, completion_tokens)

    def _finish_cancelled(self, bill: Bill) -> None:
        self._emit("error", {"code": "cancelled", "message": "the job was cancelled"},
                   status="cancelled", bill=bill)

    def _emit(self, kind: str, body: dict[str, Any], status: str = "",
              bill: Bill | None = None, client_ttft_slot: str = "") -> Appended:
        """Append an event, retrying through Redis errors for up to one lease period.

        By then the lease has run out (it was last renewed before the first
        failure), so the job is the reaper's to re-run.  The event that ends
        the job (with ``bill``) ends in the same call the lease of a job
        without a chat session, and the request that streamed the answer.

        :param client_ttft_slot: where ``body`` has the client TTFT to fill in.
        :raises LeaseLostError: another attempt owns the job.
        :raises AttemptAbandonedError: Redis stayed unreachable.
        """
        end = None
        if bill is not None:
            route = None
            if self.unreleased is not None:
                pick, need, outcome = self.unreleased
                route = self.rt.router.release_call(pick, self.job.job_id, need, outcome)
            end = Ending(lease=not self.job.spec.session, client_ttft_slot=client_ttft_slot,
                         route=route)
        deadline = time.monotonic() + self.rt.settings.lease_ttl_s
        while True:
            try:
                appended: Appended = self.rt.appender.append(
                    self.job.job_id, kind, body, lease_token=self.token, status=status,
                    expect_seq=self.next_seq, bill=bill, end=end)
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    raise AttemptAbandonedError(str(e)) from e
                log.warning("job %s: append failed, retrying: %s", self.job.job_id, e)
                gevent.sleep(0.2)
                continue
            self.next_seq = appended.seq + 1
            if end is not None and end.route is not None:
                self.unreleased = None  # ended with the job (by this call or the one it repeats)
            if appended.settled == -1:  # a job's owner is the key that reserved it
                log.error("job %s: its reservation belongs to another key; not settled",
                          self.job.job_id)
            return appended


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
