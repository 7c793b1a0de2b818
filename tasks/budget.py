"""Token-aware limits in Redis: reserve before a job is enqueued, settle when it ends.

Each API key has two continuously refilling buckets kept in one hash — tokens
(capacity = tokens per minute, refilling at a sixtieth of that per second)
and requests (likewise per minute) — plus a set of concurrency slots, one per
admitted job not yet settled, each with a deadline after which it is
reclaimed even if its job vanished.  Every decision is one Lua call timed by
Redis ``TIME``, so any number of front ends and workers share exact limits
whatever their clocks say.  Only the usage day (``YYYY-MM-DD``, UTC) comes
from the caller's clock: it picks a counter, never a limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import redis

from tasks import keys
from tasks.frames import TAKE_FUNCTION, FrameBudgetExceededError, FrameCharge
from tasks.limits import Limits, Rates

USAGE_TTL_S = 90 * 86400

# Helpers shared by the scripts below (prepended to each).  A bucket hash has
# ``tokens``, ``requests`` (levels, may be fractional, tokens may be negative
# after an overage) and ``ts_us`` (Redis time of the last write); a missing
# hash is a full bucket, which is why it may expire once it would be full.
_LEVELS = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function levels(key, now, tcap, trate, rcap, rrate)
  local b = redis.call('HMGET', key, 'tokens', 'requests', 'ts_us')
  if not b[3] then return tcap, rcap end
  -- A clock that stepped back (failover to another host) must not drain the bucket.
  local dt = math.max(0, now - tonumber(b[3])) / 1000000
  return math.min(tcap, tonumber(b[1]) + dt * trate), math.min(rcap, tonumber(b[2]) + dt * rrate)
end
local function store(key, now, tokens, requests, tcap, trate, rcap, rrate)
  -- Numbers passed to redis.call keep only 14 digits: format them ourselves.
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens),
             'requests', string.format('%.17g', requests), 'ts_us', string.format('%.0f', now))
  local full_s = math.max((tcap - tokens) / trate, (rcap - requests) / rrate)
  redis.call('PEXPIRE', key, math.ceil(full_s * 1000) + 1000)
end
"""

# Check and reserve: refill both buckets, drop slots past their deadline, and
# admit only if the whole reservation, one request and one slot all fit.
# KEYS[1] bucket hash, KEYS[2] slots zset, KEYS[3] reservation hash, KEYS[4] usage hash (today),
# KEYS[5] admitted zset
# ARGV[1] job id, ARGV[2] key id, ARGV[3] tokens to reserve, ARGV[4] prompt tokens counted,
# ARGV[5] token capacity, ARGV[6] tokens refilled per second, ARGV[7] request capacity,
# ARGV[8] requests refilled per second, ARGV[9] max concurrent jobs, ARGV[10] slot TTL ms,
# ARGV[11] reservation TTL s, ARGV[12] usage TTL s
# Returns {verdict, retry_after_ms, tokens_left, requests_left, tokens_reset_ms,
# requests_reset_ms, active_jobs}; verdict is ok, tokens, requests, concurrency, too_large
# (the reservation exceeds the bucket) or duplicate (the job id already holds one).
RESERVE_FUNCTION = """
local function reserve(KEYS, ARGV)
local now = now_us()
local now_ms = math.floor(now / 1000)
local need = tonumber(ARGV[3])
local tcap, trate = tonumber(ARGV[5]), tonumber(ARGV[6])
local rcap, rrate = tonumber(ARGV[7]), tonumber(ARGV[8])
local tokens, requests = levels(KEYS[1], now, tcap, trate, rcap, rrate)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
local active = redis.call('ZCARD', KEYS[2])
local verdict, wait_s = 'ok', 0
if need > tcap then
  verdict = 'too_large'
elseif redis.call('EXISTS', KEYS[3]) == 1 then
  verdict = 'duplicate'
else
  local token_wait = math.max(0, need - tokens) / trate
  local request_wait = math.max(0, 1 - requests) / rrate
  wait_s = math.max(token_wait, request_wait)
  if wait_s > 0 then
    verdict = token_wait >= request_wait and 'tokens' or 'requests'
  elseif active >= tonumber(ARGV[9]) then
    verdict = 'concurrency'
  end
end
if verdict == 'ok' then
  tokens, requests, active = tokens - need, requests - 1, active + 1
  store(KEYS[1], now, tokens, requests, tcap, trate, rcap, rrate)
  local slot_ms = tonumber(ARGV[10])
  redis.call('ZADD', KEYS[2], now_ms + slot_ms, ARGV[1])
  if redis.call('PTTL', KEYS[2]) < slot_ms then redis.call('PEXPIRE', KEYS[2], slot_ms) end
  redis.call('HSET', KEYS[3], 'key_id', ARGV[2], 'tokens', ARGV[3], 'prompt', ARGV[4],
             'tcap', ARGV[5], 'trate', ARGV[6], 'rcap', ARGV[7], 'rrate', ARGV[8])
  redis.call('EXPIRE', KEYS[3], ARGV[11])
  redis.call('ZADD', KEYS[5], now_ms, ARGV[1])
  redis.call('EXPIRE', KEYS[5], ARGV[11])
  redis.call('HINCRBY', KEYS[4], 'requests', 1)
elseif verdict ~= 'duplicate' then
  redis.call('HINCRBY', KEYS[4], 'rejected', 1)
end
redis.call('EXPIRE', KEYS[4], ARGV[12])
return {verdict, math.ceil(wait_s * 1000), math.floor(tokens), math.floor(requests),
        math.ceil((tcap - tokens) / trate * 1000), math.ceil((rcap - requests) / rrate * 1000),
        active}
end
"""

RESERVE = _LEVELS + RESERVE_FUNCTION + "return reserve(KEYS, ARGV)\n"

# A ``generate`` frame's metering and its admission in one call: RESERVE, after
# taking the frame from the key's frame budget (tasks/frames.py TAKE_FUNCTION).
# KEYS[1..5] and ARGV[1..12] as RESERVE's; KEYS[6] the frame bucket, ARGV[13..15]
# TAKE_FUNCTION's.  A frame the budget refuses reserves nothing and returns
# {'frames', ms until it fits, 0, 0, 0, 0, 0}; a retried call (duplicate) takes
# no second frame.  (A function too: tasks/jobs.py ADMIT_MANY admits with it.)
FRAMED_RESERVE_FUNCTION = """
local function framed_reserve(KEYS, ARGV)
if redis.call('EXISTS', KEYS[3]) == 0 then
  local wait = take_frames({KEYS[6]}, {ARGV[13], ARGV[14], ARGV[15]})
  if wait > 0 then return {'frames', wait, 0, 0, 0, 0, 0} end
end
return reserve(KEYS, ARGV)
end
"""

#: Every admission function, for a script that admits in its own call (ADMIT_MANY).
ADMIT_FUNCTIONS = _LEVELS + TAKE_FUNCTION + RESERVE_FUNCTION + FRAMED_RESERVE_FUNCTION

FRAMED_RESERVE = ADMIT_FUNCTIONS + "return framed_reserve(KEYS, ARGV)\n"


@dataclass(frozen=True)
class ReserveCall:
    """One admission's KEYS and ARGV: :data:`RESERVE`'s, or :data:`FRAMED_RESERVE`'s
    when ``framed`` (see :meth:`Budget.reserve_call`)."""

    keys: list[str]
    args: list[str | int]
    framed: bool


# Take the jobs admitted over a grace period ago off the admitted index, and
# name those that hold a reservation but whose record was never stored: the
# process that admitted them died before storing them, so nothing would ever
# settle them.  KEYS[1] admitted zset.  ARGV[1] grace ms, ARGV[2] max jobs,
# ARGV[3] job key prefix, ARGV[4] reservation key suffix.  (The job keys are
# derived, not declared: Sluice runs on a single Redis, not a cluster.)
ORPHANS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = redis.call('ZRANGE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'BYSCORE',
                       'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local job = ARGV[3] .. id
  if redis.call('EXISTS', job) == 0 and redis.call('EXISTS', job .. ARGV[4]) == 1 then
    out[#out + 1] = id
  end
end
return out
"""

# Settle a job: refund reservation - usage (or charge the overage), release its
# slot, count its usage, and delete the reservation, so a second call is a no-op.
# (A Lua function, so that the final event's append can settle in the same
# call: see tasks/events.py FINISH.)
# reservation hash, bucket hash, slots zset, usage hash (today); job id;
# prompt tokens used ('' = as counted at admission); completion tokens used;
# usage TTL s.
# Returns {reserved, charged, tokens_left}, or false when the job was settled
# before or its reservation expired.
SETTLE_FUNCTION = _LEVELS + """
local function settle(rkey, bkey, skey, ukey, job_id, prompt_arg, completion_arg, usage_ttl)
  local r = redis.call('HMGET', rkey, 'tokens', 'prompt', 'tcap', 'trate', 'rcap', 'rrate')
  if not r[1] then return false end
  local reserved = tonumber(r[1])
  local tcap, trate = tonumber(r[3]), tonumber(r[4])
  local rcap, rrate = tonumber(r[5]), tonumber(r[6])
  local prompt = prompt_arg == '' and tonumber(r[2]) or tonumber(prompt_arg)
  local completion = tonumber(completion_arg)
  local now = now_us()
  local tokens, requests = levels(bkey, now, tcap, trate, rcap, rrate)
  -- An overage can take the bucket below zero: later requests wait it off.
  tokens = math.min(tcap, tokens + reserved - prompt - completion)
  store(bkey, now, tokens, requests, tcap, trate, rcap, rrate)
  redis.call('ZREM', skey, job_id)
  redis.call('HINCRBY', ukey, 'prompt_tokens', prompt)
  redis.call('HINCRBY', ukey, 'completion_tokens', completion)
  redis.call('EXPIRE', ukey, usage_ttl)
  redis.call('DEL', rkey)
  return {reserved, prompt + completion, math.floor(tokens)}
end
"""

# Settle a job (see SETTLE_FUNCTION).
# KEYS[1] reservation hash, KEYS[2] bucket hash, KEYS[3] slots zset, KEYS[4] usage hash (today)
# ARGV[1] job id, ARGV[2] prompt tokens used ('' = as counted at admission),
# ARGV[3] completion tokens used, ARGV[4] usage TTL s
# Returns {reserved, charged, tokens_left}, or false when already settled or expired.
SETTLE = SETTLE_FUNCTION + """
return settle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
"""

# Renew the slot of a job that is still running, so it outlives its deadline.
# KEYS[1] reservation hash, KEYS[2] slots zset. ARGV[1] job id, ARGV[2] slot TTL ms.
# Returns 1 if the job holds a reservation (slot renewed or taken back), else 0.
TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local slot_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + slot_ms,
           ARGV[1])
if redis.call('PTTL', KEYS[2]) < slot_ms then redis.call('PEXPIRE', KEYS[2], slot_ms) end
return 1
"""

# Read a key's limits without reserving anything.
# KEYS[1] bucket hash, KEYS[2] slots zset.
# ARGV[1] token capacity, ARGV[2] tokens per second, ARGV[3] request capacity, ARGV[4] requests/s
# Returns {tokens_left, requests_left, tokens_reset_ms, requests_reset_ms, active_jobs}.
PEEK = _LEVELS + """
local now = now_us()
local tcap, trate = tonumber(ARGV[1]), tonumber(ARGV[2])
local rcap, rrate = tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, requests = levels(KEYS[1], now, tcap, trate, rcap, rrate)
local active = redis.call('ZCOUNT', KEYS[2], string.format('(%.0f', math.floor(now / 1000)), '+inf')
return {math.floor(tokens), math.floor(requests), math.ceil((tcap - tokens) / trate * 1000),
        math.ceil((rcap - requests) / rrate * 1000), active}
"""


@dataclass(frozen=True)
class Reservation:
    """The outcome of :meth:`Budget.reserve`."""

    admitted: bool
    #: ``ok``, or the limit that refused: ``tokens``, ``requests``, ``concurrency``, ``too_large``.
    verdict: str
    #: Seconds until the refused request would fit the buckets; ``None`` unless refused by one.
    retry_after_s: float | None
    limits: Limits


@dataclass(frozen=True)
class Settlement:
    """What settling a job did to its key's bucket."""

    key_id: str
    reserved: int
    charged: int
    remaining_tokens: int

    @property
    def refunded(self) -> int:
        """Tokens given back; negative when an overage was charged."""
        return self.reserved - self.charged


@dataclass(frozen=True)
class DayUsage:
    """One API key's usage on one UTC day."""

    day: str
    #: Requests admitted.
    requests: int = 0
    #: Requests refused by a rate or concurrency limit (not those refused for size or model).
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Bill:
    """What an ended job used, to settle its reservation with (once).

    Example::

        bill = Bill("k1", prompt_tokens=44, completion_tokens=120)
        budget.settle(job_id, bill.prompt_tokens, bill.completion_tokens)
    """

    #: The API key that owns the job (and holds its reservation).
    key_id: str
    #: Prompt tokens the provider billed; ``None`` for the admission count.
    prompt_tokens: int | None
    completion_tokens: int
    usage_ttl_s: int = USAGE_TTL_S

    def __post_init__(self) -> None:
        if (self.prompt_tokens or 0) < 0 or self.completion_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {self.prompt_tokens}, "
                             f"{self.completion_tokens}")

    def keys(self, job_id: str) -> list[str]:
        """The keys :data:`SETTLE_FUNCTION` takes, in order."""
        return [keys.reservation(job_id), keys.bucket(self.key_id), keys.slots(self.key_id),
                keys.usage(self.key_id, today())]

    def args(self, job_id: str) -> list[str | int]:
        """The arguments :data:`SETTLE_FUNCTION` takes after the keys, in order."""
        return [job_id, "" if self.prompt_tokens is None else self.prompt_tokens,
                self.completion_tokens, self.usage_ttl_s]


class DuplicateReservationError(ValueError):
    """The job id already holds a reservation."""


class Budget:
    """Reserves tokens, requests and concurrency slots for jobs, and settles them.

    Example::

        budget = Budget(redis.Redis.from_url(url))
        res = budget.reserve("k1", job_id, 300, Rates(10_000, 60, 4), prompt_tokens=44,
                             slot_ttl_ms=600_000, reservation_ttl_s=4200)
        ...
        budget.settle(job_id, prompt_tokens=44, completion_tokens=120)
    """

    def __init__(self, client: redis.Redis, *, usage_ttl_s: int = USAGE_TTL_S) -> None:
        self.redis = client
        self.usage_ttl_s = usage_ttl_s
        self._reserve = client.register_script(RESERVE)
        self._framed_reserve = client.register_script(FRAMED_RESERVE)
        self._settle = client.register_script(SETTLE)
        self._touch = client.register_script(TOUCH)
        self._peek = client.register_script(PEEK)
        self._orphans = client.register_script(ORPHANS)

    def reserve(self, key_id: str, job_id: str, tokens: int, rates: Rates, *,
                prompt_tokens: int, slot_ttl_ms: int, reservation_ttl_s: int,
                frame: FrameCharge | None = None) -> Reservation:
        """Reserve ``tokens``, one request and one concurrency slot for a job, or refuse.

        :param key_id: the API key whose buckets pay.
        :param job_id: the job the reservation belongs to; settle it with this id.
        :param tokens: the whole reservation: prompt tokens plus the output allowance.
        :param rates: the key's limits.
        :param prompt_tokens: the prompt's counted tokens (used when settle is not told).
        :param slot_ttl_ms: how long the slot is held unless settled or renewed by :meth:`touch`.
        :param reservation_ttl_s: how long the job may stay unsettled; should match its record.
        :param frame: the request's frame, to take from the key's frame budget first, in
            the same call (:meth:`tasks.frames.FrameBudget.charge`).
        :return: whether it was admitted, else which limit refused and for how long.
        :raises DuplicateReservationError: ``job_id`` already holds a reservation.
        :raises tasks.frames.FrameBudgetExceededError: ``frame`` did not fit (nothing was taken).
        """
        call = self.reserve_call(key_id, job_id, tokens, rates, prompt_tokens=prompt_tokens,
                                 slot_ttl_ms=slot_ttl_ms, reservation_ttl_s=reservation_ttl_s,
                                 frame=frame)
        return self.reservation(job_id, rates, self.run(call))

    def run(self, call: ReserveCall) -> Any:
        """Run an admission on its own; its raw reply (:meth:`reservation` reads it)."""
        script = self._framed_reserve if call.framed else self._reserve
        return script(keys=call.keys, args=call.args)

    def reserve_call(self, key_id: str, job_id: str, tokens: int, rates: Rates, *,
                     prompt_tokens: int, slot_ttl_ms: int, reservation_ttl_s: int,
                     frame: FrameCharge | None = None) -> ReserveCall:
        """The KEYS and ARGV of :meth:`reserve` (same parameters), for a caller that
        runs the admission in a call of its own (:data:`tasks.jobs.ADMIT_MANY`)."""
        keys_ = [keys.bucket(key_id), keys.slots(key_id), keys.reservation(job_id),
                 keys.usage(key_id, today()), keys.ADMITTED]
        args: list[str | int] = [job_id, key_id, tokens, prompt_tokens, *rates.args(),
                                 rates.max_concurrent_jobs, slot_ttl_ms, reservation_ttl_s,
                                 self.usage_ttl_s]
        if frame is None:
            return ReserveCall(keys_, args, False)
        return ReserveCall([*keys_, frame[0]], [*args, *frame[1]], True)

    @staticmethod
    def reservation(job_id: str, rates: Rates, reply: list[Any]) -> Reservation:
        """Read an admission's reply (see :meth:`reserve` for what it raises)."""
        verdict, wait_ms, t_left, r_left, t_reset, r_reset, active = reply
        verdict = verdict.decode()
        if verdict == "frames":
            raise FrameBudgetExceededError(wait_ms / 1000)
        if verdict == "duplicate":
            raise DuplicateReservationError(f"job {job_id!r} already holds a reservation")
        limits = Limits(rates.tokens_per_minute, int(t_left), t_reset / 1000,
                        rates.requests_per_minute, int(r_left), r_reset / 1000,
                        rates.max_concurrent_jobs, int(active))
        waited = verdict in ("tokens", "requests")
        return Reservation(verdict == "ok", verdict, wait_ms / 1000 if waited else None, limits)

    def settle(self, job_id: str, prompt_tokens: int | None,
               completion_tokens: int) -> Settlement | None:
        """Reconcile a finished job with what it really used; only the first call counts.

        :param job_id: the job, as reserved.
        :param prompt_tokens: prompt tokens the provider billed; ``None`` for the admission count.
        :param completion_tokens: completion tokens produced (0 for a job that never ran).
        :return: what was refunded or charged, or ``None`` when the job was already settled,
            was never admitted, or its reservation expired.
        :raises ValueError: a negative token count.
        """
        bill = Bill("", prompt_tokens, completion_tokens, self.usage_ttl_s)
        key_id = self._key_of(job_id)
        if key_id is None:
            return None
        bill = replace(bill, key_id=key_id)
        out = self._settle(keys=bill.keys(job_id), args=bill.args(job_id))
        if out is None:
            return None
        reserved, charged, left = out
        return Settlement(key_id, int(reserved), int(charged), int(left))

    def refund_orphans(self, grace_ms: int, limit: int = 200) -> list[str]:
        """Refund the jobs admitted over ``grace_ms`` ago whose record was never stored.

        Such a job's front end died between admission and storing it, so no
        worker will ever settle it; without this its slot and reservation would
        stay taken for the job's whole lifetime.  Any number of processes may
        call it: each admitted job is looked at once.

        :return: the ids refunded.
        """
        job_prefix = keys.job("")
        orphans = [i.decode() for i in self._orphans(
            keys=[keys.ADMITTED],
            args=[grace_ms, limit, job_prefix, keys.reservation("")[len(job_prefix):]])]
        for job_id in orphans:
            self.settle(job_id, 0, 0)
        return orphans

    def touch(self, job_id: str, slot_ttl_ms: int, key_id: str | None = None) -> bool:
        """Push a running job's slot deadline ``slot_ttl_ms`` into the future.

        :param key_id: the key that owns the job, when the caller knows it (saves a read).
        :return: whether the job still holds a reservation.
        """
        key_id = key_id or self._key_of(job_id)
        if key_id is None:
            return False
        return bool(self._touch(keys=[keys.reservation(job_id), keys.slots(key_id)],
                                args=[job_id, slot_ttl_ms]))

    def limits(self, key_id: str, rates: Rates) -> Limits:
        """Report a key's remaining tokens, requests and slots without reserving any."""
        t_left, r_left, t_reset, r_reset, active = self._peek(
            keys=[keys.bucket(key_id), keys.slots(key_id)], args=rates.args())
        return Limits(rates.tokens_per_minute, int(t_left), t_reset / 1000,
                      rates.requests_per_minute, int(r_left), r_reset / 1000,
                      rates.max_concurrent_jobs, int(active))

    def usage(self, key_id: str, days: int = 7) -> list[DayUsage]:
        """Return a key's usage for the last ``days`` UTC days, newest first."""
        now = time.time()
        dates = [today(now - 86400 * i) for i in range(days)]
        pipe = self.redis.pipeline(transaction=False)
        for day in dates:
            pipe.hgetall(keys.usage(key_id, day))
        rows = pipe.execute()
        return [DayUsage(day, **{k.decode(): int(v) for k, v in row.items()})
                for day, row in zip(dates, rows, strict=True)]

    def _key_of(self, job_id: str) -> str | None:
        # The keys a script touches must be named before it runs, so the API
        # key is read first; the script re-checks that the reservation exists.
        value = self.redis.hget(keys.reservation(job_id), "key_id")
        return value.decode() if isinstance(value, bytes) else value


def today(at: float | None = None) -> str:
    """The UTC date ``YYYY-MM-DD`` of ``at`` (now when ``None``)."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))
