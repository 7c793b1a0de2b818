"""What a job is: its record in Redis, its lease, and chat-session ordering."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from tasks import keys
from tasks.budget import ADMIT_FUNCTIONS, ReserveCall
from tasks.coalesce import Coalescer
from tasks.routing import PICK_FUNCTION, estimate_tokens

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
FINAL = frozenset({"done", "error", "cancelled"})

# Create a job record and, for a chat session, queue it behind the session's
# earlier jobs; put the job's broker message on the Celery queue when it may
# start now, so that a submit is one call (no producer round trip of its own).
# A job that may start now enters the unstarted index (see TRACK) even when
# the caller sends its message, so that a producer dying before it sends
# loses nothing either.
# KEYS[1] job hash, KEYS[2] session list (a dummy key when there is no session),
# KEYS[3] the Celery queue's list (its depth; the message goes on it),
# KEYS[4] unstarted-jobs zset
# ARGV[1] TTL seconds, ARGV[2] session name ('' for none), ARGV[3] the broker
# message ('' to enqueue it elsewhere), ARGV[4..] field, value…
# Returns {session jobs ahead of this one (0 = may start now), jobs waiting in the queue}.
CREATE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'created_ms', now, 'queued_ms', now, 'status', 'queued',
           unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local waiting = redis.call('LLEN', KEYS[3])
local ahead = 0
if ARGV[2] ~= '' then
  ahead = redis.call('RPUSH', KEYS[2], string.sub(KEYS[1], -32)) - 1
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
if ahead == 0 then
  if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[3]) end
  redis.call('ZADD', KEYS[4], now, string.sub(KEYS[1], -32))
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
return {ahead, waiting}
"""

# Create several jobs without a chat session that arrived together, and push
# one broker message that starts them all (see tasks.queue.StartBatcher):
# like CREATE for each, with a single LPUSH.  A job may be admitted in the
# same call (tasks/budget.py RESERVE, or FRAMED_RESERVE for a metered
# frame), and is then created only if admitted: one round trip from a
# request to its queue.  Each job enters the unstarted index on its own, so a
# lost message is made good job by job; a message none of whose jobs was
# created is not pushed (a worker taking one of a refused job's id finds no
# record, and does nothing for it).
# KEYS[1] the Celery queue's list, KEYS[2] unstarted-jobs zset, then per job:
# its hash, then the keys of its admission (RESERVE's 5, FRAMED_RESERVE's 6).
# ARGV[1] TTL seconds, ARGV[2] the broker message naming every job, then per
# job (in KEYS order): its admission (0 none: admitted before; 1 RESERVE's 12
# arguments follow; 2 FRAMED_RESERVE's 15 follow), the number n of arguments
# that follow, then n field, value…
# Returns {waiting, admissions}: the number of jobs waiting in the queue before
# the message was pushed, and per job its admission's reply (0 when none).
ADMIT_MANY = ADMIT_FUNCTIONS + """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local waiting = redis.call('LLEN', KEYS[1])
local k, i = 3, 3
local scored, replies = {}, {}
while k <= #KEYS do
  local job, mode, reply = KEYS[k], tonumber(ARGV[i]), 0
  k, i = k + 1, i + 1
  if mode > 0 then
    local nk, na = 5 + mode - 1, 12 + (mode - 1) * 3
    local rk, ra = {unpack(KEYS, k, k + nk - 1)}, {unpack(ARGV, i, i + na - 1)}
    reply = mode == 1 and reserve(rk, ra) or framed_reserve(rk, ra)
    k, i = k + nk, i + na
  end
  replies[#replies + 1] = reply
  local n = tonumber(ARGV[i])
  if mode == 0 or reply[1] == 'ok' or reply[1] == 'duplicate' then
    redis.call('HSET', job, 'created_ms', now, 'queued_ms', now, 'status', 'queued',
               unpack(ARGV, i + 1, i + n))
    redis.call('EXPIRE', job, ARGV[1])
    scored[#scored + 1] = now
    scored[#scored + 1] = string.sub(job, -32)
  end
  i = i + n + 1
end
if #scored > 0 then
  redis.call('ZADD', KEYS[2], unpack(scored))
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('LPUSH', KEYS[1], ARGV[2])
end
return {waiting, replies}
"""

# Enter a job in the unstarted index as its message is sent (a re-run, a chat
# session's next job, a job its creator did not enqueue): scored now, and the
# job's queued_ms reset, which the back-off of CLAIM_UNSTARTED counts from.
# KEYS[1] job hash, KEYS[2] unstarted zset.  ARGV[1] job id, ARGV[2] TTL s of the zset.
# Returns 1, or 0 when the job does not exist (nothing is entered).
TRACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'queued_ms', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Claim the jobs sent more than ARGV[1] ms ago that no attempt has started,
# for the caller to send again; drop the entries of jobs that need nothing
# (expired, ended, or leased by a live attempt: that attempt's death is the
# running zset's business).  A claimed job is re-scored so that its next
# claim comes max(grace, time it has waited so far) later: a job that waits
# long in a busy queue gets a few duplicate messages (a doubling back-off),
# not one per grace period; a duplicate does nothing (START refuses it).
# KEYS[1] unstarted zset. ARGV[1] grace ms, ARGV[2] max jobs, ARGV[3] job key
# prefix, ARGV[4] lease key suffix (after the job key).
# Returns {job id, queue, job id, queue, ...}.  (The job and lease keys are
# derived, not declared: Sluice runs on a single Redis, not a cluster.)
CLAIM_UNSTARTED = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local grace = tonumber(ARGV[1])
local ids = redis.call('ZRANGE', KEYS[1], '-inf', now - grace, 'BYSCORE', 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  local job = ARGV[3] .. id
  local f = redis.call('HMGET', job, 'status', 'queue', 'queued_ms', 'created_ms')
  local status = f[1]
  if not status or status == 'done' or status == 'error' or status == 'cancelled'
     or redis.call('EXISTS', job .. ARGV[4]) == 1 then
    redis.call('ZREM', KEYS[1], id)
  else
    local waited = now - tonumber(f[3] or f[4] or now)
    redis.call('ZADD', KEYS[1], now + math.max(0, waited - grace), id)
    out[#out + 1] = id
    out[#out + 1] = f[2] or ''
  end
end
return out
"""

# Take a finished job off the head of its session and name the next one,
# skipping jobs whose record has expired (nothing would ever start them).
# KEYS[1] session list. ARGV[1] the finished job id, ARGV[2] the job key prefix.
# Returns the job id now at the head (to be started), or false.  Idempotent:
# a job that is no longer the head is left alone.  (The skipped records' keys
# are derived, not declared: Sluice runs on a single Redis, not a cluster.)
ADVANCE = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return false end
redis.call('LPOP', KEYS[1])
local head = redis.call('LINDEX', KEYS[1], 0)
while head and redis.call('EXISTS', ARGV[2] .. head) == 0 do
  redis.call('LPOP', KEYS[1])
  head = redis.call('LINDEX', KEYS[1], 0)
end
return head
"""

# Flag a job for cancellation if it exists, and tell the workers.
# KEYS[1] job hash, KEYS[2] cancels channel. ARGV[1] job id.
# Returns 1 if the job exists (flagged now or before), else 0.
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1)
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""

# Start an attempt at a job: take its lease (unless another attempt holds it
# or the job has ended), record that it runs, and return its record, all in
# one round trip.  The deadline in the running zset is what the reaper
# watches; whatever the outcome, the job leaves the unstarted index (a job
# held by a live attempt is the running zset's business).  A call retried
# after a lost reply (the lease is already ours) returns the record without
# counting a second attempt.
# KEYS[1] job hash, KEYS[2] lease, KEYS[3] running zset, KEYS[4] unstarted zset.
# ARGV[1] token, ARGV[2] lease TTL ms, ARGV[3] job id.
# Returns {1, field, value, ...} (the record, attempts and started_ms updated)
# when the lease is ours; {0} when another attempt holds it; {-1, owner,
# session} when the job has ended; {-2} when it does not exist.
START_FUNCTION = """
local function start(KEYS, ARGV)
redis.call('ZREM', KEYS[4], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'done' or status == 'error' or status == 'cancelled' then
  local f = redis.call('HMGET', KEYS[1], 'owner', 'session')
  return {-1, f[1] or '', f[2] or ''}
end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return {0} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], now + ARGV[2], ARGV[3])
if not cur then
  redis.call('HSET', KEYS[1], 'status', 'running')
  redis.call('HSETNX', KEYS[1], 'started_ms', now)
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, 1)
return out
end
"""

START = START_FUNCTION + "return start(KEYS, ARGV)\n"

# START, then, once the lease is ours, the attempt's first pick of a deployment
# (tasks/routing.py PICK_FUNCTION), in the same call: one round trip fewer on
# every job's way to its provider.  KEYS and ARGV[1..3] as START's; ARGV[4]
# every model's candidates as JSON (Router.first_pick_args), ARGV[5] a random
# number, ARGV[6..8] PICK's in-flight deadline ms, latency buffer, state TTL ms.
# The pick uses the record's model and route_tokens (stored at creation); a
# record without them, or a model the JSON does not route, is not picked for.
# Returns {START's reply, PICK's reply or {}}.
START_PICK = START_FUNCTION + PICK_FUNCTION + """
local out = start(KEYS, ARGV)
if out[1] ~= 1 then return {out, {}} end
local f = redis.call('HMGET', KEYS[1], 'model', 'route_tokens')
local route = f[1] and f[2] and cjson.decode(ARGV[4])[f[1]]
if not route then return {out, {}} end
local k, a = {}, {route.s, ARGV[3], f[2], ARGV[5], ARGV[6], ARGV[7], ARGV[8], '0'}
for _, d in ipairs(route.d) do
  k[#k + 1], k[#k + 2], k[#k + 3] = d[1], d[2], d[3]
  a[#a + 1], a[#a + 2], a[#a + 3], a[#a + 4] = d[4], d[5], d[6], '0'
end
return {out, pick(k, a)}
"""

# Renew the leases of a worker process's running jobs, each only if it is
# still held by the same attempt: a lease that ran out is never taken back
# (the job may already run elsewhere).  Also reports requested cancels, for a
# cancel whose announcement the worker missed.
# KEYS[1] running zset, then per job: lease, job hash.
# ARGV[1] lease TTL ms, then per job: job id, token.
# Returns one code per job: 1 renewed, 2 renewed and a cancel was requested,
# 0 the lease is lost (the attempt must stop).
RENEW = """
local t = redis.call('TIME')
local deadline = t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[1]
local out = {}
for i = 2, #KEYS, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call('GET', KEYS[i]) == token then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[1], deadline, id)
    out[#out + 1] = redis.call('HEXISTS', KEYS[i + 1], 'cancel') + 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# Give the lease back, only if we hold it.
# KEYS[1] lease, KEYS[2] running zset. ARGV[1] token, ARGV[2] job id.  Returns 1 if released.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Claim running jobs whose lease ran out (their worker died) so that exactly
# one reaper re-enqueues each; a claimed job gets ARGV[1] ms before it can be
# claimed again.
# KEYS[1] running zset. ARGV[1] grace ms, ARGV[2] max jobs.  Returns the job ids.
CLAIM_ORPHANS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now + ARGV[1], id) end
return ids
"""


@dataclass
class JobSpec:
    """A generation request as a client made it."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float | None = None
    seed: int | None = None
    session: str | None = None
    owner: str = "anonymous"
    #: The Celery queue the job runs on; every re-run goes back to it.
    queue: str = "sluice"
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Job:
    """A job's record as stored in Redis."""

    job_id: str
    spec: JobSpec
    status: str
    created_ms: int
    started_ms: int | None
    seq: int
    attempts: int
    cancel_requested: bool


@dataclass(frozen=True)
class Start:
    """What :meth:`JobStore.start` found.

    ``outcome`` is ``started`` (``job`` is the record, this attempt holds the
    lease), ``held`` (another attempt holds it), ``ended`` (``owner`` and
    ``session`` say which session to advance) or ``missing``.
    """

    outcome: Literal["started", "held", "ended", "missing"]
    job: Job | None = None
    owner: str = ""
    session: str = ""
    #: PICK's reply for the attempt's first pick, when the start made it.
    pick: list[Any] | None = None


class JobStore:
    """Creates, reads and orders jobs.

    Example::

        store = JobStore(redis.Redis.from_url(url), ttl_s=4200)
        job_id, ahead = store.create(JobSpec(model="mock-1", messages=[...], max_tokens=64))
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._create = client.register_script(CREATE)
        self._admit_many = client.register_script(ADMIT_MANY)
        self._advance = client.register_script(ADVANCE)
        self._start = client.register_script(START)
        self._start_pick = client.register_script(START_PICK)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._cancel = client.register_script(CANCEL)
        self._claim = client.register_script(CLAIM_ORPHANS)
        self._track = client.register_script(TRACK)
        self._claim_unstarted = client.register_script(CLAIM_UNSTARTED)
        # Client TTFTs are written in the background, many per round trip.
        self._ttfts: Coalescer[tuple[str, float]] = Coalescer(self._write_ttfts, max_batch=256)

    def create(self, spec: JobSpec, job_id: str | None = None, message: str = ""
               ) -> tuple[str, int]:
        """Store a new job, under ``job_id`` when given (admission chose it).

        :param message: the job's broker message (see :class:`tasks.queue.TaskMessages`),
            pushed onto ``spec.queue`` in the same call when the job may start now
            (no session, or the session's first); empty: the caller enqueues.
            Either way a job that may start now enters the unstarted index.
        :return: the job id and its position: how many of its session's jobs run
            before it, or for a job without a session, how many jobs wait in its queue.
        """
        job_id = job_id or uuid.uuid4().hex
        flat = _fields(spec)
        session_key = keys.session(spec.owner, spec.session) if spec.session else keys.job(job_id)
        ahead, waiting = self._create(keys=[keys.job(job_id), session_key, spec.queue,
                                            keys.UNSTARTED],
                                      args=[self.ttl_s, spec.session or "", message, *flat])
        return job_id, int(ahead if spec.session else waiting)

    def create_many_call(self, jobs: Sequence[tuple[str, JobSpec, ReserveCall | None]],
                         message: str) -> tuple[Any, list[str], list[Any]]:
        """The :data:`ADMIT_MANY` call (script, keys, args) storing ``jobs`` under one message.

        Every job must be without a chat session and on the same queue.  A job
        given with its admission (:meth:`tasks.budget.Budget.reserve_call`) is
        admitted in the call, and stored only if admitted.  The caller runs the
        call (on its own, or in a pipeline) and reads its reply with
        :meth:`created_many`.
        """
        queue = jobs[0][1].queue
        keys_ = [queue, keys.UNSTARTED]
        args: list[Any] = [self.ttl_s, message]
        for job_id, spec, admission in jobs:
            assert not spec.session and spec.queue == queue, "one queue, no sessions"
            flat = _fields(spec)
            keys_.append(keys.job(job_id))
            if admission is None:
                args.append(0)
            else:
                keys_ += admission.keys
                args += [2 if admission.framed else 1, *admission.args]
            args += [len(flat), *flat]
        return self._admit_many, keys_, args

    @staticmethod
    def created_many(reply: list[Any]) -> tuple[int, list[Any]]:
        """An :data:`ADMIT_MANY` call's reply: the jobs that waited in the queue before
        the message, and per job its admission's reply (0 for a job admitted before)."""
        waiting, admissions = reply
        return int(waiting), list(admissions)

    def create_many(self, jobs: list[tuple[str, JobSpec]], message: str) -> int:
        """Store jobs without a session, all on one queue, and push ``message`` that runs them all.

        :return: how many jobs waited in the queue before them.
        """
        script, keys_, args = self.create_many_call([(j, s, None) for j, s in jobs], message)
        return self.created_many(script(keys=keys_, args=args))[0]

    def get(self, job_id: str) -> Job | None:
        """Read a job's record, or ``None`` when it does not exist or has expired."""
        return _job(job_id, self.redis.hgetall(keys.job(job_id)))

    def progress(self, job_id: str) -> tuple[str | None, str | None, int]:
        """A job's owner, status and number of events so far (``None``s when it does not exist)."""
        owner, status, seq = self.redis.hmget(keys.job(job_id), ["owner", "status", "seq"])
        return (_text(owner) if owner is not None else None,
                _text(status) if status is not None else None, int(seq or 0))

    def owner_of(self, job_id: str) -> str | None:
        """The key id that owns a job, or ``None`` when it does not exist."""
        value = self.redis.hget(keys.job(job_id), "owner")
        return _text(value) if value is not None else None

    def queue_of(self, job_id: str) -> str | None:
        """The Celery queue a job runs on, or ``None`` when it does not exist."""
        value = self.redis.hget(keys.job(job_id), "queue")
        return _text(value) if value is not None else None

    def status(self, job_id: str) -> str | None:
        """The job's status, or ``None`` when it does not exist."""
        value = self.redis.hget(keys.job(job_id), "status")
        return _text(value) if value is not None else None

    def record_client_ttft(self, job_id: str, ms: float) -> None:
        """Record when the submitting client got its first token (ms after acceptance).

        Never blocks: the write joins the next batch (a failure is logged).
        """
        self._ttfts.submit((job_id, round(ms, 3)), what=f"recording job {job_id}'s client TTFT")

    def _write_ttfts(self, batch: list[tuple[str, float]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id, ms in batch:
            pipe.hsetnx(keys.job(job_id), "client_ttft_ms", ms)
        return list(pipe.execute(raise_on_error=False))

    def client_ttft_ms(self, job_id: str) -> float | None:
        """The client-facing TTFT a front end recorded, if any."""
        value = self.redis.hget(keys.job(job_id), "client_ttft_ms")
        return float(value) if value is not None else None

    def request_cancel(self, job_id: str) -> bool:
        """Flag a job for cancellation; return whether the job exists."""
        return bool(self._cancel(keys=[keys.job(job_id), keys.CANCELS], args=[job_id]))

    def start(self, job_id: str, token: str, ttl_ms: int,
              pick_args: list[str | int | float] | None = None) -> Start:
        """Start an attempt: take the job's lease for ``ttl_ms`` and mark the job running.

        Counts the attempt and, on the first, records ``started_ms`` (Redis
        time, like ``created_ms``).  Nothing changes unless the lease is taken.

        :param pick_args: :meth:`tasks.routing.Router.first_pick_args`: once the
            lease is taken, also pick the attempt's first deployment, in the same
            call; its reply is ``Start.pick`` (``None`` when none was made).
        """
        keys_ = [keys.job(job_id), keys.lease(job_id), keys.RUNNING, keys.UNSTARTED]
        pick = None
        if pick_args is None:
            raw = self._start(keys=keys_, args=[token, ttl_ms, job_id])
        else:
            raw, pick = self._start_pick(keys=keys_, args=[token, ttl_ms, job_id, *pick_args])
        code = int(raw[0])
        if code == 1:
            job = _job(job_id, dict(zip(raw[1::2], raw[2::2], strict=True)))
            assert job is not None, "a started job has a record"
            return Start("started", job, pick=list(pick) if pick else None)
        if code == -1:
            return Start("ended", owner=_text(raw[1]), session=_text(raw[2]))
        return Start("held" if code == 0 else "missing")

    def renew_leases(self, held: list[tuple[str, str]], ttl_ms: int) -> list[int]:
        """Renew many leases in one call; each only while its token still holds it.

        :param held: ``(job id, lease token)`` pairs.
        :return: per pair, 1 renewed, 2 renewed and a cancel was requested, 0 lost.
        """
        if not held:
            return []
        job_keys = [k for job_id, _ in held for k in (keys.lease(job_id), keys.job(job_id))]
        args = [x for pair in held for x in pair]
        return [int(code) for code in self._renew(keys=[keys.RUNNING, *job_keys],
                                                  args=[ttl_ms, *args])]

    def release_lease(self, job_id: str, token: str) -> None:
        """Give the lease back if ``token`` holds it."""
        self._release(keys=[keys.lease(job_id), keys.RUNNING], args=[token, job_id])

    def claim_orphans(self, grace_ms: int, limit: int = 100) -> list[str]:
        """Claim jobs whose lease ran out without being released; return their ids."""
        return [i.decode() for i in self._claim(keys=[keys.RUNNING], args=[grace_ms, limit])]

    def track_unstarted(self, job_id: str) -> bool:
        """Enter a job whose message is being sent in the unstarted index; whether it exists."""
        return bool(self._track(keys=[keys.job(job_id), keys.UNSTARTED],
                                args=[job_id, self.ttl_s]))

    def claim_unstarted(self, grace_ms: int, limit: int = 100) -> list[tuple[str, str]]:
        """Claim jobs sent over ``grace_ms`` ago that never started; return ``(id, queue)`` pairs.

        Entries of jobs that ended, expired or run are dropped instead; each
        claimed job backs off (see :data:`CLAIM_UNSTARTED`).
        """
        lease_suffix = keys.lease("").removeprefix(keys.job(""))
        raw = self._claim_unstarted(keys=[keys.UNSTARTED],
                                    args=[grace_ms, limit, keys.job(""), lease_suffix])
        return [(_text(raw[i]), _text(raw[i + 1])) for i in range(0, len(raw), 2)]

    def forget_running(self, job_id: str) -> None:
        """Drop a job from the running set (it has ended or expired)."""
        self.redis.zrem(keys.RUNNING, job_id)

    def advance_session(self, owner: str, session: str, job_id: str) -> str | None:
        """Pop a finished job off its session; return the next job to start, if any."""
        nxt = self._advance(keys=[keys.session(owner, session)], args=[job_id, keys.job("")])
        return nxt.decode() if nxt else None


def _fields(spec: JobSpec) -> list[str]:
    """A job record's fields as CREATE takes them: field, value, field, value…"""
    fields: dict[str, str] = {
        "model": spec.model, "messages": json.dumps(spec.messages),
        "max_tokens": str(spec.max_tokens), "owner": spec.owner, "queue": spec.queue,
        # What the worker's first routing pick counts (see START_PICK).
        "route_tokens": str(estimate_tokens(spec.messages, spec.max_tokens)),
        **spec.extra,
    }
    if spec.temperature is not None:
        fields["temperature"] = repr(spec.temperature)
    if spec.seed is not None:
        fields["seed"] = str(spec.seed)
    if spec.session:
        fields["session"] = spec.session
    return [x for kv in fields.items() for x in kv]


def _job(job_id: str, record: dict[bytes, bytes] | dict[Any, Any]) -> Job | None:
    raw = {_text(k): _text(v) for k, v in record.items()}
    if "model" not in raw:
        return None
    spec = JobSpec(
        model=raw["model"], messages=json.loads(raw["messages"]),
        max_tokens=int(raw["max_tokens"]),
        temperature=float(raw["temperature"]) if "temperature" in raw else None,
        seed=int(raw["seed"]) if "seed" in raw else None,
        session=raw.get("session"), owner=raw.get("owner", "anonymous"),
        queue=raw.get("queue", "sluice"))
    return Job(job_id=job_id, spec=spec, status=raw["status"],
               created_ms=int(raw["created_ms"]),
               started_ms=int(raw["started_ms"]) if "started_ms" in raw else None,
               seq=int(raw.get("seq", 0)), attempts=int(raw.get("attempts", 0)),
               cancel_requested="cancel" in raw)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
