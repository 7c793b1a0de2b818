"""Routing jobs to deployments, with the counters every worker shares in Redis.

Design, simplest first: two Lua calls per provider request and nothing else.
:meth:`Router.pick` drops the deployments that cool down or are at their
limits, chooses one by the model's strategy, and counts the request in flight
and its tokens in this minute — in the same call, so no two workers ever
decide on the same stale figures.  :meth:`Router.release` ends the request:
out of flight, tokens reconciled with the real usage, TTFT folded into the
moving average, a failure counted (and the deployment cooled down when they
pile up, or for the provider's ``Retry-After``).  Cooldowns are keys with
``PX``, so a deployment comes back by itself.  Redis ``TIME`` is the clock.

Strategies (per model, :data:`tasks.deployments.STRATEGIES`):

* ``weighted``: a random deployment, in proportion to its weight.
* ``least-busy``: the fewest requests in flight per unit of weight.
* ``usage``: the most tokens left this minute (its TPM less tokens counted,
  reservations included, and no more than the provider's own
  ``x-ratelimit-remaining-tokens`` while that figure is fresh).
* ``latency``: among those whose moving TTFT is within ``latency_buffer`` of
  the fastest, the least busy (so equal deployments share evenly); a
  deployment with no sample yet counts as fastest, so it gets tried.
* ``ordered``: the first in the file's order (a primary with fallbacks).

Ties go to a random one of the tied.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from tasks import keys
from tasks.deployments import ModelRoute, Providers

#: A deployment's state outlives its last request by this long.
STATE_TTL_S = 86400
#: Longest cooldown a provider's ``Retry-After`` may impose.
MAX_RETRY_AFTER_S = 300.0

# Pick a deployment for one request and count it, in one call.
# KEYS: per candidate, three keys: state hash, in-flight zset, cooldown string
# ARGV[1] strategy, ARGV[2] job id, ARGV[3] tokens to count, ARGV[4] a random number in [0, 1),
# ARGV[5] in-flight deadline ms, ARGV[6] latency buffer, ARGV[7] state TTL ms,
# ARGV[8] 1 = only deployments not yet tried,
# then per candidate: weight, tpm, rpm, tried (1 = already tried by this job)
# Returns {index (1-based), minute} of the chosen one, or {0, wait_ms}: none may serve
# now, the soonest may in wait_ms.  A job's entries in every candidate's in-flight set
# are dropped first, so a re-run after its worker died leaves no count behind.
# A function, so that an attempt's first pick can be made in the call that takes
# its job's lease (tasks/jobs.py START_PICK).
PICK_FUNCTION = """
local function pick(KEYS, ARGV)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local strategy, job, need, rnd = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 3
local fresh, retry, wait = {}, {}, -1
local function later(ms) if wait < 0 or ms < wait then wait = ms end end
for i = 1, n do
  local hk, fk, ck = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local a = 9 + 4 * (i - 1)
  local weight, tpm, rpm = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2])
  redis.call('ZREM', fk, job)
  local cool = redis.call('PTTL', ck)
  if cool > 0 or cool == -1 then
    later(cool > 0 and cool or 1000)
  else
    redis.call('ZREMRANGEBYSCORE', fk, '-inf', now)
    local s = redis.call('HMGET', hk, 'm', 'tok', 'req', 'ttft', 'hrem', 'huntil')
    local tok, req = 0, 0
    if tonumber(s[1]) == minute then tok, req = tonumber(s[2]) or 0, tonumber(s[3]) or 0 end
    local left = (tpm > 0 and tpm or 1e15) - tok
    local huntil = tonumber(s[6]) or 0
    if huntil > now then left = math.min(left, tonumber(s[5]) - tok) end
    if (tpm > 0 and tok + need > tpm) or (rpm > 0 and req + 1 > rpm) then
      later((minute + 1) * 60000 - now)
    elseif huntil > now and tonumber(s[5]) < need then
      later(huntil - now)
    else
      local c = {i = i, weight = weight, busy = redis.call('ZCARD', fk) / weight,
                 left = left, ttft = tonumber(s[4]) or 0}
      if ARGV[a+3] == '1' then table.insert(retry, c) else table.insert(fresh, c) end
    end
  end
end
local cands = (#fresh > 0 or ARGV[8] == '1') and fresh or retry
if #cands == 0 then return {0, math.max(1, wait)} end
local function least(list, field, sign)
  local best, ties = nil, {}
  for _, c in ipairs(list) do
    local v = sign * c[field]
    if best == nil or v < best then
      best, ties = v, {c}
    elseif v == best then
      table.insert(ties, c)
    end
  end
  return ties[math.floor(rnd * #ties) + 1]
end
local chosen
if strategy == 'ordered' then
  chosen = cands[1]
elseif strategy == 'weighted' then
  local total = 0
  for _, c in ipairs(cands) do total = total + c.weight end
  local x = rnd * total
  for _, c in ipairs(cands) do
    chosen = c
    x = x - c.weight
    if x < 0 then break end
  end
elseif strategy == 'usage' then
  chosen = least(cands, 'left', -1)
elseif strategy == 'latency' then
  local fastest = least(cands, 'ttft', 1).ttft
  local near = {}
  for _, c in ipairs(cands) do
    if c.ttft <= fastest * (1 + tonumber(ARGV[6])) then table.insert(near, c) end
  end
  chosen = least(near, 'busy', 1)
else
  chosen = least(cands, 'busy', 1)
end
local i = chosen.i
local hk, fk = KEYS[3*i-2], KEYS[3*i-1]
redis.call('ZADD', fk, now + tonumber(ARGV[5]), job)
redis.call('PEXPIRE', fk, tonumber(ARGV[5]))
if tonumber(redis.call('HGET', hk, 'm')) ~= minute then
  redis.call('HSET', hk, 'm', minute, 'tok', 0, 'req', 0)
end
redis.call('HINCRBY', hk, 'tok', need)
redis.call('HINCRBY', hk, 'req', 1)
redis.call('PEXPIRE', hk, tonumber(ARGV[7]))
return {i, minute}
end
"""

PICK = PICK_FUNCTION + "return pick(KEYS, ARGV)\n"

# End one request on a deployment (a Lua function, so that the FINISH script
# of tasks/events.py can end a job's successful request in the same call; it
# takes two tables, named as a script's so that RELEASE passes its own).
# KEYS[1] state hash, KEYS[2] in-flight zset, KEYS[3] cooldown string, KEYS[4] failure count
# ARGV[1] job id, ARGV[2] minute of the pick, ARGV[3] tokens counted at the pick,
# ARGV[4] tokens really used, ARGV[5] TTFT ms (-1: none), ARGV[6] EWMA alpha,
# ARGV[7] outcome: ok, fail or none (cancelled: neither), ARGV[8] Retry-After ms (0: none),
# ARGV[9] cooldown ms, ARGV[10] failures that start a cooldown, ARGV[11] failure window ms,
# ARGV[12] provider's remaining tokens (-1: not reported), ARGV[13] ms until they reset,
# ARGV[14] state TTL ms, ARGV[15] '1' = only if the job is still counted in flight there
# (a release that may have been made already: then it changes nothing).  An
# in-flight entry that is never released drops out at its deadline (the job
# timeout and a minute) or when the job is picked again (PICK).
# Returns the cooldown set, in ms (0: none).
RELEASE_FUNCTION = """
local function release_route(KEYS, ARGV)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 and ARGV[15] == '1' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'm')) == tonumber(ARGV[2]) then
  local tok = tonumber(redis.call('HGET', KEYS[1], 'tok')) or 0
  redis.call('HSET', KEYS[1], 'tok', math.max(0, tok + tonumber(ARGV[4]) - tonumber(ARGV[3])))
end
local ttft = tonumber(ARGV[5])
if ttft >= 0 then
  local old = tonumber(redis.call('HGET', KEYS[1], 'ttft'))
  local a = tonumber(ARGV[6])
  local new = old and (a * ttft + (1 - a) * old) or ttft
  redis.call('HSET', KEYS[1], 'ttft', string.format('%.3f', new))
end
if tonumber(ARGV[12]) >= 0 then
  redis.call('HSET', KEYS[1], 'hrem', ARGV[12], 'huntil', now + tonumber(ARGV[13]))
end
local cooled = 0
if ARGV[7] == 'fail' then
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
  local retry_after = tonumber(ARGV[8])
  if retry_after > 0 then
    if redis.call('PTTL', KEYS[3]) < retry_after then
      redis.call('SET', KEYS[3], 'retry-after', 'PX', retry_after)
      cooled = retry_after
    end
  else
    local fails = redis.call('INCR', KEYS[4])
    if fails == 1 then redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[11])) end
    if fails >= tonumber(ARGV[10]) then
      redis.call('SET', KEYS[3], 'failures', 'PX', tonumber(ARGV[9]))
      redis.call('DEL', KEYS[4])
      cooled = tonumber(ARGV[9])
    end
  end
elseif ARGV[7] == 'ok' then
  redis.call('HINCRBY', KEYS[1], 'served', 1)
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[14]))
return cooled
end
"""

# End one request on a deployment: KEYS and ARGV as RELEASE_FUNCTION's.
RELEASE = RELEASE_FUNCTION + """
return release_route(KEYS, ARGV)
"""


@dataclass(frozen=True)
class Pick:
    """A deployment chosen for one request, or how long until one may serve."""

    deployment: str | None
    #: The model name to send upstream.
    upstream_model: str = ""
    #: The minute (Redis time) the tokens were counted in; given back to :meth:`Router.release`.
    minute: int = 0
    #: When none may serve: seconds until the soonest may.
    wait_s: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """How a request on a deployment ended, for :meth:`Router.release`."""

    ok: bool
    tokens_used: int = 0
    ttft_s: float | None = None
    #: Count it as the deployment's failure (False for a cancel or a client-side error).
    failed: bool = False
    retry_after_s: float | None = None
    #: The provider's ``x-ratelimit-remaining-tokens`` and when they reset.
    remaining_tokens: int | None = None
    reset_s: float | None = None


@dataclass(frozen=True)
class DeploymentState:
    """What Redis says of one deployment now (``sluice providers``, ``/metrics``)."""

    name: str
    in_flight: int
    tokens_this_minute: int
    requests_this_minute: int
    ttft_ms: float | None
    #: Milliseconds left of its cooldown (0: healthy) and why it cools down.
    cooldown_ms: int
    cooldown_reason: str
    recent_failures: int
    served: int
    failed: int
    #: The provider's last ``x-ratelimit-remaining-tokens``, while it holds (None: not sent).
    provider_remaining_tokens: int | None = None


class Router:
    """Chooses deployments for jobs, with counters shared by all workers in Redis.

    Example::

        router = Router(redis_client, load_providers(settings), settings.job_timeout_s)
        pick = router.pick("mock-1", job_id, tokens=300)
        ...   # stream from pick.deployment, asking for pick.upstream_model
        router.release(pick, job_id, 300, Outcome(ok=True, tokens_used=280, ttft_s=0.2))
    """

    def __init__(self, client: redis.Redis, providers: Providers, job_timeout_s: float) -> None:
        self.redis = client
        self.providers = providers
        self._inflight_ms = int(job_timeout_s * 1000) + 60_000
        self._pick = client.register_script(PICK)
        self._release = client.register_script(RELEASE)
        self._keys = {name: (keys.deployment(name), keys.deployment_inflight(name),
                             keys.deployment_cooldown(name)) for name in providers.deployments}
        # Every model's candidates, as START_PICK reads them: {model: {"s": strategy,
        # "d": [[state, in-flight, cooldown keys, weight, tpm, rpm], ...]}}.
        self._routes_json = json.dumps({model: {"s": route.strategy, "d": [
            [*self._keys[n], providers.deployments[n].weight, providers.deployments[n].tpm,
             providers.deployments[n].rpm] for n in route.deployments]}
            for model, route in providers.models.items()})

    def first_pick_args(self) -> list[str | int | float]:
        """What :data:`tasks.jobs.START_PICK` needs to make a job's first pick itself.

        Every model's candidates (as :meth:`pick` passes them, none tried),
        then the arguments of :data:`PICK_FUNCTION` that do not depend on the
        job: the script reads the job's model and ``route_tokens`` from its
        record, so the lease and the first pick take one round trip.
        """
        return [self._routes_json, random.random(), self._inflight_ms,
                self.providers.gateway.latency_buffer, STATE_TTL_S * 1000]

    def picked(self, route: ModelRoute, reply: Sequence[Any]) -> Pick:
        """The :class:`Pick` of a PICK reply for ``route`` (made by :meth:`pick` or START_PICK)."""
        i, second = int(reply[0]), int(reply[1])
        if i == 0:
            return Pick(None, wait_s=second / 1000)
        dep = self.providers.deployments[route.deployments[i - 1]]
        return Pick(dep.name, dep.models[route.name], second)

    def pick(self, route: ModelRoute, job_id: str, tokens: int,
             tried: Sequence[str] = (), *, untried_only: bool = False) -> Pick:
        """Choose a deployment for ``route``'s model and count the request on it.

        Deployments already ``tried`` by this job are chosen only when no other
        may serve, and never with ``untried_only``.

        :param tokens: the request's estimated tokens (prompt and output cap).
        """
        deps = [self.providers.deployments[n] for n in route.deployments]
        k: list[str] = []
        argv: list[str | int | float] = [
            route.strategy, job_id, tokens, random.random(), self._inflight_ms,
            self.providers.gateway.latency_buffer, STATE_TTL_S * 1000, 1 if untried_only else 0]
        for d in deps:
            k.extend(self._keys[d.name])
            argv.extend((d.weight, d.tpm, d.rpm, 1 if d.name in tried else 0))
        return self.picked(route, self._pick(keys=k, args=argv))

    def release(self, pick: Pick, job_id: str, tokens: int, outcome: Outcome, *,
                once: bool = False) -> float:
        """End a request counted by :meth:`pick`.

        :param tokens: the tokens counted at the pick.
        :param once: only if the job is still counted in flight on the deployment:
            for a release that may have been made already (it then changes nothing).
        :return: the cooldown this put the deployment in, in seconds (0: none).
        """
        keys_, args = self.release_call(pick, job_id, tokens, outcome, once=once)
        return int(self._release(keys=keys_, args=args)) / 1000

    def release_call(self, pick: Pick, job_id: str, tokens: int, outcome: Outcome, *,
                     once: bool = False) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of :data:`RELEASE_FUNCTION` for :meth:`release`.

        (The FINISH script of :mod:`tasks.events` takes them, to end a job's
        successful request in the call that ends the job.)
        """
        assert pick.deployment is not None
        g = self.providers.gateway
        name = pick.deployment
        retry_after = min(outcome.retry_after_s or 0.0, MAX_RETRY_AFTER_S)
        return [*self._keys[name], keys.deployment_fails(name)], [
            job_id, pick.minute, tokens, outcome.tokens_used,
            round(outcome.ttft_s * 1000, 3) if outcome.ttft_s is not None else -1, g.ttft_alpha,
            "ok" if outcome.ok else "fail" if outcome.failed else "none",
            int(retry_after * 1000), int(g.cooldown_s * 1000), g.allowed_fails,
            int(g.fail_window_s * 1000),
            outcome.remaining_tokens if outcome.remaining_tokens is not None else -1,
            int((outcome.reset_s or 0) * 1000), STATE_TTL_S * 1000, 1 if once else 0]

    def states(self) -> list[DeploymentState]:
        """Every configured deployment's state, in file order (one pipeline)."""
        names = list(self.providers.deployments)
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for n in names:
            pipe.hgetall(keys.deployment(n))
            pipe.pttl(keys.deployment_cooldown(n))
            pipe.get(keys.deployment_cooldown(n))
            pipe.get(keys.deployment_fails(n))
        replies = pipe.execute()
        sec, usec = replies[0]
        now = sec * 1000 + usec // 1000
        minute = now // 60000
        pipe = self.redis.pipeline(transaction=False)
        for n in names:
            pipe.zcount(keys.deployment_inflight(n), now, "+inf")
        in_flight = pipe.execute()
        out = []
        for j, n in enumerate(names):
            h, pttl, why, fails = replies[1 + 4 * j: 5 + 4 * j]
            h = {k.decode(): v.decode() for k, v in h.items()}
            this_minute = h.get("m") == str(minute)
            fresh = int(h.get("huntil", 0)) > now
            out.append(DeploymentState(
                n, int(in_flight[j]), int(h.get("tok", 0)) if this_minute else 0,
                int(h.get("req", 0)) if this_minute else 0,
                float(h["ttft"]) if "ttft" in h else None,
                max(0, int(pttl)), why.decode() if why else "", int(fails or 0),
                int(h.get("served", 0)), int(h.get("failed", 0)),
                int(h["hrem"]) if fresh and "hrem" in h else None))
        return out


def estimate_tokens(messages: list[dict[str, Any]], max_tokens: int) -> int:
    """A cheap estimate of a request's tokens (4 characters a token), reconciled on release."""
    chars = 0
    for m in messages:
        content = m.get("content")
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    return chars // 4 + len(messages) * 4 + max_tokens
