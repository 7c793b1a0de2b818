"""Client-frame budgets: how many frames a socket, and an API key, may send.

Admission meters tokens; these meter frames, so that no client can make a
front end (or Redis, or the event logs) work without bound by sending
requests that cost nothing in tokens — a flood of ``resume`` frames, each
replaying a long log, was the case that made them necessary.  Both are token
buckets: a socket's lives in its process (:class:`FrameBucket`, free), an
API key's in Redis (:class:`FrameBudget`, one Lua call timed by Redis
``TIME``), shared by all its sockets on every front end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis

from tasks import keys
from tasks.coalesce import Coalescer, run_scripts
from tasks.limits import Rates

# Take ``cost`` frames from an API key's frame bucket, refilling it first; a
# missing hash is a full bucket, which is why it may expire once it would be full.
# KEYS[1] the bucket hash. ARGV[1] capacity, ARGV[2] refill per second, ARGV[3] cost.
# Returns 0 when the frames were taken, else the ms until they would be there
# (nothing is taken then).  A function, so that admission can meter a
# ``generate`` frame in its own call (tasks.budget.FRAMED_RESERVE).
TAKE_FUNCTION = """
local function take_frames(KEYS, ARGV)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cap, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'level', 'ts_us')
local level = cap
if b[1] then
  level = math.min(cap, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) / 1000000 * rate)
end
if level < cost then return math.ceil((cost - level) / rate * 1000) end
level = level - cost
redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level),
           'ts_us', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate * 1000) + 1000)
return 0
end
"""

TAKE = TAKE_FUNCTION + "return take_frames(KEYS, ARGV)\n"


#: A frame charge: the key's frame bucket and :data:`TAKE_FUNCTION`'s ARGV.
FrameCharge = tuple[str, list[str]]


class FrameBudgetExceededError(Exception):
    """A frame the key's frame budget refused (nothing was taken); retry after ``wait_s``."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"frame budget used up; retry in {wait_s:.3f}s")
        self.wait_s = wait_s


class FrameBucket:
    """One socket's frame allowance, kept in its process.

    Example::

        bucket = FrameBucket(per_s=20, burst=100)
        wait_s = bucket.take()          # 0.0: go ahead; else retry after wait_s
    """

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s = per_s
        self.burst = float(burst)
        self.level = float(burst)
        self.ts = time.monotonic()

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` frames; return 0.0, or the seconds until they fit (nothing taken).

        A cost above the burst is charged as the whole burst, so it can still pass.
        """
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.ts) * self.per_s)
        self.ts = now
        cost = min(cost, self.burst)
        if self.level < cost:
            return (cost - self.level) / self.per_s
        self.level -= cost
        return 0.0


class FrameBudget:
    """The frame allowance of every API key, in Redis.

    It is never stricter than the key's tier: a tier that allows more requests
    per minute than the configured burst gets that many frames per minute.

    Example::

        budget = FrameBudget(client, per_s=500, burst=2000, tiers={"pro": pro.rates})
        wait_s = budget.take(key_id, "pro", cost=3)    # one round trip

    Takes made while one is in flight go to Redis together, in one pipeline
    (every socket of a front end meters its frames here).
    """

    def __init__(self, client: redis.Redis, *, per_s: float, burst: int,
                 tiers: Mapping[str, Rates] | None = None) -> None:
        self.per_s = per_s
        self.burst = burst
        self.tiers = dict(tiers or {})
        self.redis = client
        self._take = client.register_script(TAKE)
        self._takes: Coalescer[FrameCharge] = Coalescer(self._run, max_batch=256)

    def take(self, key_id: str, tier: str, cost: float = 1.0) -> float:
        """Take ``cost`` frames from the key's bucket; return 0.0, or seconds until they fit.

        :param tier: the key's tier, whose request rate is the budget's floor.
        :raises redis.RedisError: Redis cannot be reached.
        """
        wait_ms = self._takes.call(self.charge(key_id, tier, cost),
                                   what=f"metering a frame of key {key_id}")
        return int(wait_ms) / 1000

    def charge(self, key_id: str, tier: str, cost: float = 1.0) -> FrameCharge:
        """The key and arguments of :data:`TAKE_FUNCTION` that take ``cost`` frames.

        :meth:`take` runs it; admission runs it in its own call for a ``generate``
        frame (:meth:`tasks.budget.Budget.reserve`), one round trip fewer.
        """
        rates = self.tiers.get(tier)
        per_minute = rates.requests_per_minute if rates else 0
        burst = max(self.burst, per_minute)
        per_s = max(self.per_s, per_minute / 60)
        return (keys.frames(key_id),
                [str(burst), repr(float(per_s)), repr(float(min(cost, burst)))])

    def _run(self, batch: list[FrameCharge]) -> list[object]:
        # One script for all: a batch refused with NOSCRIPT ran none of them.
        return run_scripts(self.redis, [(self._take, [key], args) for key, args in batch])
