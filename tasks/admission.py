"""The admission decision the front end asks before it stores or enqueues a job.

A request is admitted when its key's tier allows the model and the sizes, and
the key's buckets hold its whole reservation — the prompt's exact token count
plus its output allowance — along with one request and one concurrency slot.
The decision is one Redis call (see :mod:`tasks.budget`); a refused request
costs no worker time.  When the job ends, the worker settles it with what it
really used.

It lives in the core because two kinds of process admit: the front ends
(interactive requests) and the bulk pump on the workers (bulk and batch
items, see :mod:`tasks.pump`).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import redis

from tasks.budget import (
    USAGE_TTL_S,
    Budget,
    DayUsage,
    DuplicateReservationError,
    ReserveCall,
    Settlement,
)
from tasks.config import Settings
from tasks.deployments import load_providers
from tasks.frames import FrameCharge
from tasks.jobs import JobSpec
from tasks.limits import Limits
from tasks.tiers import Tier, load_tiers
from tasks.tokens import count_message_tokens

log = logging.getLogger(__name__)

HTTP_STATUS = {"rate_limited": 429, "concurrency_limit": 429, "too_large": 400,
               "model_not_allowed": 403, "unavailable": 503}


class KeyLike(Protocol):
    """Who a request acts for, as admission sees it (:class:`app.apikeys.KeyLike` is one)."""

    @property
    def key_id(self) -> str:
        """The API key's id: whose buckets pay."""

    @property
    def tier(self) -> str:
        """The name of the key's tier."""


class AdmissionRejectedError(Exception):
    """A request refused before it became a job; ``code`` is stable, the message names why."""

    def __init__(self, code: str, message: str, retry_after: float | None = None,
                 limits: Limits | None = None, *, queueable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: Seconds after which the same request fits the buckets (rate_limited only).
        self.retry_after = retry_after
        self.limits = limits
        #: The key's tier asks to hold such requests until they fit instead of refusing.
        self.queueable = queueable
        #: The request's frame was taken from the key's frame budget by this refusal's
        #: call (see ``frame`` in :meth:`Admission.admit`).
        self.frame_taken = False

    @property
    def http_status(self) -> int:
        """The HTTP status answering this refusal."""
        return HTTP_STATUS[self.code]

    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, rounded up) and the ``x-ratelimit-*`` headers."""
        out = self.limits.headers() if self.limits else {}
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out

    def frame(self, ref: Any) -> str:
        """The WebSocket ``error`` frame telling the client why, and when to retry."""
        body: dict[str, Any] = {"type": "error", "ref": ref, "code": self.code,
                                "message": self.message}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        if self.limits is not None:
            body["limits"] = self.limits.as_dict()
        return json.dumps(body)


@dataclass(frozen=True)
class Admitted:
    """An admitted request: the job must be created under ``job_id`` as ``spec``."""

    job_id: str
    #: The job as it must run: owner, output cap and queue filled in.
    spec: JobSpec
    tier: str
    prompt_tokens: int
    reserved_tokens: int
    #: The key's figures after this reservation; ``None`` when admitted without Redis.
    limits: Limits | None
    #: False when Redis was unreachable and the gateway is set to fail open.
    enforced: bool = True


@dataclass(frozen=True)
class Pending:
    """An admission prepared up to its Redis call (:meth:`Admission.prepare`)."""

    job_id: str
    spec: JobSpec
    tier: Tier
    prompt_tokens: int
    #: The whole reservation: prompt tokens plus the output allowance.
    need: int
    #: The reservation's call (:meth:`tasks.budget.Budget.run` runs it on its own).
    call: ReserveCall

    def admitted(self, limits: Limits | None, *, enforced: bool = True) -> Admitted:
        """The admission, once its call admitted it (``limits`` from its reply)."""
        return Admitted(self.job_id, self.spec, self.tier.name, self.prompt_tokens, self.need,
                        limits, enforced)


class Admission:
    """Decides admissions against each key's tier and settles jobs when they end.

    Example::

        admission = Admission.from_settings(settings)
        admitted = admission.admit(key_info, spec)        # raises AdmissionRejectedError
        ...                                                # create the job as admitted.job_id
        admission.settle(admitted.job_id, prompt_tokens=44, completion_tokens=120)
    """

    def __init__(self, client: redis.Redis, tiers: Mapping[str, Tier], *, job_ttl_s: int,
                 slot_ttl_s: float, fail_open: bool = False,
                 usage_ttl_s: int = USAGE_TTL_S, queue: str = "sluice",
                 queues: Mapping[str, str] | None = None) -> None:
        self.tiers = dict(tiers)
        #: The Celery queue admitted jobs run on, unless ``queues`` names their model's.
        self.queue = queue
        #: Model -> Celery queue (the providers config, :mod:`tasks.deployments`).
        self.queues = dict(queues or {})
        self.budget = Budget(client, usage_ttl_s=usage_ttl_s)
        self.job_ttl_s = job_ttl_s
        self.slot_ttl_s = slot_ttl_s
        self._slot_ttl_ms = max(1, round(slot_ttl_s * 1000))
        self.fail_open = fail_open

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> Admission:
        """Build the admission controller of a process from its settings.

        Uses ``settings.tiers_file`` (see :mod:`tasks.tiers`) and
        ``settings.admission_fail_open``.  A reservation lives as long as the
        job record; a concurrency slot is reclaimed ``settings.slot_ttl_s``
        after its last renewal if the job never settles.

        :param client: the process's Redis client; a new one when ``None``.
        :raises tasks.tiers.TierConfigError: the tiers file is bad.
        :raises tasks.deployments.ProvidersConfigError: the providers file is bad.
        """
        providers = load_providers(settings)
        unserved = [m for m in settings.model_names if providers.route(m) is None]
        if unserved:
            # Said once at start: otherwise each job of these models fails
            # with model_not_found only once a worker runs it.
            log.warning("no deployment in %s serves model(s) %s of SLUICE_MODELS; their jobs "
                        "will end with model_not_found", providers.source, ", ".join(unserved))
        return cls(client or settings.redis_client(), load_tiers(settings.tiers_file or None),
                   job_ttl_s=settings.job_ttl_s, slot_ttl_s=settings.slot_ttl_s,
                   fail_open=settings.admission_fail_open, queue=settings.queue,
                   queues=providers.queues())

    def tier_of(self, key: KeyLike) -> Tier:
        """The tier of ``key``.

        :raises AdmissionRejectedError: ``unavailable``, the tier is not configured.
        """
        tier = self.tiers.get(key.tier)
        if tier is None:
            raise AdmissionRejectedError("unavailable", f"API key {key.key_id}'s tier "
                                         f"{key.tier!r} is not configured on this gateway")
        return tier

    def precheck(self, key: KeyLike, spec: JobSpec, *, max_tokens_given: bool = True
                 ) -> tuple[Tier, int]:
        """The checks of :meth:`admit` that need neither Redis nor a token count.

        The bulk engine runs them on every item when it is submitted, so an item
        that could never run is refused at once instead of after its wait.

        :return: the key's tier and the output allowance the job will reserve.
        :raises AdmissionRejectedError: ``unavailable`` (unknown tier),
            ``model_not_allowed`` or ``too_large`` (``max_tokens``).
        """
        tier = self.tier_of(key)
        if not tier.allows(spec.model):
            raise AdmissionRejectedError("model_not_allowed", f"model {spec.model!r} is not "
                                         f"available to the {tier.name!r} tier; allowed: "
                                         f"{', '.join(tier.models)}")
        max_tokens = spec.max_tokens if max_tokens_given else tier.default_output_tokens
        if max_tokens > tier.max_output_tokens:
            raise AdmissionRejectedError("too_large", f"max_tokens {max_tokens} exceeds the "
                                         f"{tier.name!r} tier's limit of "
                                         f"{tier.max_output_tokens}")
        return tier, max_tokens

    def admit(self, key: KeyLike, spec: JobSpec, *, max_tokens_given: bool = True,
              job_id: str | None = None, batch: bool = False,
              frame: FrameCharge | None = None) -> Admitted:
        """Admit a request and reserve its tokens, or say why not and for how long.

        :param key: the authenticated key.
        :param spec: the validated request.
        :param max_tokens_given: whether the client set ``max_tokens``; when not, the
            tier's default output allowance replaces ``spec.max_tokens``.
        :param job_id: the id the job will have; a new one when ``None``.  Admitting
            the same id twice reserves once (the second call returns without ``limits``).
        :param batch: a bulk or batch item: it may take the key's buckets no lower than
            ``1 - tier.batch_share`` of their capacity (checked just before the
            reservation; an item too large for that may take a full bucket), so
            interactive requests keep the rest.  Refused like an interactive request
            (``rate_limited`` with ``retry_after``) when it does not fit.
        :param frame: the request's WebSocket frame, taken from the key's frame budget
            in the reservation's own call (one round trip for both).  A refusal made
            before that call has not taken it (its ``frame_taken`` is False).
        :return: the reservation; the job must be stored as its ``job_id`` and ``spec``.
        :raises AdmissionRejectedError: ``model_not_allowed``, ``too_large``,
            ``rate_limited`` (with ``retry_after``), ``concurrency_limit``, or
            ``unavailable`` when Redis cannot be reached and the gateway fails closed.
        :raises tasks.frames.FrameBudgetExceededError: ``frame`` did not fit the key's
            frame budget; nothing was reserved or taken.
        """
        pending = self.prepare(key, spec, max_tokens_given=max_tokens_given, job_id=job_id,
                               frame=frame)
        try:
            if batch and pending.tier.batch_share < 1:
                self._keep_interactive_share(key, pending.tier, pending.need)
            reply = self.budget.run(pending.call)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if self.fail_open:
                return pending.admitted(None, enforced=False)
            raise self.unreachable() from e
        return self.conclude(pending, reply)

    def prepare(self, key: KeyLike, spec: JobSpec, *, max_tokens_given: bool = True,
                job_id: str | None = None, frame: FrameCharge | None = None) -> Pending:
        """Everything of :meth:`admit` before its Redis call (same parameters): the checks,
        the prompt's count, and the call, for a caller that runs it in a call of its own
        (:class:`tasks.queue.StartBatcher`) and then reads its reply with :meth:`conclude`.

        :raises AdmissionRejectedError: what :meth:`precheck` raises, or ``too_large``.
        """
        tier, max_tokens = self.precheck(key, spec, max_tokens_given=max_tokens_given)
        prompt = _count(spec.messages, spec.model)
        if prompt > tier.max_prompt_tokens:
            raise AdmissionRejectedError("too_large", f"the prompt has {prompt} tokens; the "
                                         f"{tier.name!r} tier allows {tier.max_prompt_tokens}")
        need = prompt + max_tokens
        if need > tier.tokens_per_minute:
            raise AdmissionRejectedError("too_large", f"the request needs {need} tokens "
                                         f"({prompt} prompt + {max_tokens} output), more than "
                                         f"the {tier.name!r} tier's bucket of "
                                         f"{tier.tokens_per_minute}")
        job_id = job_id or uuid.uuid4().hex
        spec = replace(spec, max_tokens=max_tokens, owner=key.key_id,
                       queue=self.queues.get(spec.model, self.queue))
        call = self.budget.reserve_call(key.key_id, job_id, need, tier.rates,
                                        prompt_tokens=prompt, slot_ttl_ms=self._slot_ttl_ms,
                                        reservation_ttl_s=self.job_ttl_s, frame=frame)
        return Pending(job_id, spec, tier, prompt, need, call)

    def conclude(self, pending: Pending, reply: Any) -> Admitted:
        """Read the reply of the call of an admission made by :meth:`prepare`.

        :raises AdmissionRejectedError: the buckets, slots or size refused it.
        :raises tasks.frames.FrameBudgetExceededError: the frame did not fit; nothing
            was reserved or taken.
        """
        try:
            res = self.budget.reservation(pending.job_id, pending.tier.rates, reply)
        except DuplicateReservationError:
            # Our own reserve, retried by the Redis client after its reply was
            # lost: the first call went through.
            return pending.admitted(None)
        if res.admitted:
            return pending.admitted(res.limits)
        refusal = _refusal(res.verdict, pending.need, res.retry_after_s, res.limits,
                           pending.tier)
        refusal.frame_taken = pending.call.framed
        raise refusal

    @staticmethod
    def unreachable() -> AdmissionRejectedError:
        """The refusal of a request whose admission could not reach Redis (failing closed)."""
        return AdmissionRejectedError("unavailable", "the gateway cannot reach Redis to "
                                      "check rate limits; retry shortly")

    def _keep_interactive_share(self, key: KeyLike, tier: Tier, need: int) -> None:
        """Refuse a batch item that would take the buckets into the interactive share.

        :raises AdmissionRejectedError: ``rate_limited``, with the wait until it fits.
        """
        limits = self.budget.limits(key.key_id, tier.rates)
        keep = 1 - tier.batch_share
        waits = []
        for cap, left, take in ((tier.tokens_per_minute, limits.remaining_tokens, need),
                                (tier.requests_per_minute, limits.remaining_requests, 1)):
            floor = max(0.0, min(keep * cap, cap - take))
            waits.append(max(0.0, floor + take - left) / (cap / 60))
        wait = max(waits)
        if wait > 0:
            raise AdmissionRejectedError(
                "rate_limited", f"batch items may use {tier.batch_share:.0%} of the "
                f"{tier.name!r} tier's buckets; the rest is kept for interactive requests; "
                f"retry in {wait:.3f}s", round(wait, 3), limits)

    def settle(self, job_id: str, prompt_tokens: int | None,
               completion_tokens: int) -> Settlement | None:
        """Reconcile an ended job (done, error, cancelled, given up) exactly once.

        :param prompt_tokens: what the provider billed; ``None`` for the admission count.
        :param completion_tokens: tokens generated, 0 when the job never ran.
        :return: the refund or charge, or ``None`` when already settled.
        :raises redis.RedisError: Redis cannot be reached; call again later.
        """
        return self.budget.settle(job_id, prompt_tokens, completion_tokens)

    def limits(self, key: KeyLike) -> Limits:
        """The key's current figures, for ``x-ratelimit-*`` headers on any response."""
        return self.budget.limits(key.key_id, self.tier_of(key).rates)

    def usage(self, key_id: str, days: int = 7) -> list[DayUsage]:
        """The key's usage for its last ``days`` UTC days, newest first."""
        return self.budget.usage(key_id, days)


#: Prompts longer than this are counted on gevent's thread pool: counting 30k
#: tokens takes ~10 ms, which would stall every socket of the process.
THREADPOOL_CHARS = 16_000


def _count(messages: list[dict[str, Any]], model: str) -> int:
    if sum(len(str(m.get("content", ""))) for m in messages) < THREADPOOL_CHARS:
        return count_message_tokens(messages, model)
    import gevent

    return int(gevent.get_hub().threadpool.apply(count_message_tokens, (messages, model)))


def _refusal(verdict: str, need: int, retry_after: float | None, limits: Limits,
             tier: Tier) -> AdmissionRejectedError:
    if verdict == "tokens":
        return AdmissionRejectedError(
            "rate_limited", f"the request needs {need} tokens; {max(0, limits.remaining_tokens)} "
            f"of {tier.tokens_per_minute} per minute are left; retry in {retry_after:.3f}s",
            retry_after, limits, queueable=tier.queue_instead_of_429)
    if verdict == "requests":
        return AdmissionRejectedError(
            "rate_limited", f"the {tier.requests_per_minute} requests per minute of the "
            f"{tier.name!r} tier are used up; retry in {retry_after:.3f}s", retry_after, limits,
            queueable=tier.queue_instead_of_429)
    if verdict == "concurrency":
        return AdmissionRejectedError(
            "concurrency_limit", f"{limits.active_jobs} jobs of this key are running; the "
            f"{tier.name!r} tier allows {tier.max_concurrent_jobs} at once", None, limits)
    return AdmissionRejectedError("too_large", f"the request needs {need} tokens, more than "
                                  f"the bucket of {tier.tokens_per_minute}", None, limits)
