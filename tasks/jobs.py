"""What a job is: its record in Redis, its lease, and chat-session ordering."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from tasks import keys

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
FINAL = frozenset({"done", "error", "cancelled"})

# Create a job record and, for a chat session, queue it behind the session's
# earlier jobs.
# KEYS[1] job hash, KEYS[2] session list (a dummy key when there is no session)
# ARGV[1] TTL seconds, ARGV[2] session name ('' for none), ARGV[3..] field, value…
# Returns the number of the session's jobs ahead of this one (0 = may start now).
CREATE = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'created_ms', t[1] * 1000 + math.floor(t[2] / 1000),
           'status', 'queued', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[2] == '' then return 0 end
local n = redis.call('RPUSH', KEYS[2], string.sub(KEYS[1], -32))
redis.call('EXPIRE', KEYS[2], ARGV[1])
return n - 1
"""

# Take a finished job off the head of its session and name the next one.
# KEYS[1] session list. ARGV[1] the finished job id.
# Returns the job id now at the head (to be started), or false.  Idempotent:
# a job that is no longer the head is left alone.
ADVANCE = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  return redis.call('LINDEX', KEYS[1], 0)
end
return false
"""

# Take the lease of a job, or renew it if we already hold it.
# KEYS[1] lease. ARGV[1] token, ARGV[2] TTL ms. Returns 1 if held by us now.
LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Flag a job for cancellation if it exists.  KEYS[1] job hash.
# Returns 1 if the job exists (flagged now or before), else 0.
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1)
return 1
"""

# Give the lease back, only if we hold it.  KEYS[1] lease. ARGV[1] token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
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
        self._advance = client.register_script(ADVANCE)
        self._lease = client.register_script(LEASE)
        self._release = client.register_script(RELEASE)
        self._cancel = client.register_script(CANCEL)

    def create(self, spec: JobSpec) -> tuple[str, int]:
        """Store a new job.

        :return: the job id and how many of its session's jobs run before it.
        """
        job_id = uuid.uuid4().hex
        fields: dict[str, str] = {
            "model": spec.model, "messages": json.dumps(spec.messages),
            "max_tokens": str(spec.max_tokens), "owner": spec.owner, **spec.extra,
        }
        if spec.temperature is not None:
            fields["temperature"] = repr(spec.temperature)
        if spec.seed is not None:
            fields["seed"] = str(spec.seed)
        if spec.session:
            fields["session"] = spec.session
        flat = [x for kv in fields.items() for x in kv]
        session_key = keys.session(spec.session) if spec.session else keys.job(job_id)
        ahead = self._create(keys=[keys.job(job_id), session_key],
                             args=[self.ttl_s, spec.session or "", *flat])
        return job_id, int(ahead)

    def get(self, job_id: str) -> Job | None:
        """Read a job's record, or ``None`` when it does not exist or has expired."""
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.job(job_id)).items()}
        if "model" not in raw:
            return None
        spec = JobSpec(
            model=raw["model"], messages=json.loads(raw["messages"]),
            max_tokens=int(raw["max_tokens"]),
            temperature=float(raw["temperature"]) if "temperature" in raw else None,
            seed=int(raw["seed"]) if "seed" in raw else None,
            session=raw.get("session"), owner=raw.get("owner", "anonymous"))
        return Job(job_id=job_id, spec=spec, status=raw["status"],
                   created_ms=int(raw["created_ms"]),
                   started_ms=int(raw["started_ms"]) if "started_ms" in raw else None,
                   seq=int(raw.get("seq", 0)), attempts=int(raw.get("attempts", 0)),
                   cancel_requested="cancel" in raw)

    def status(self, job_id: str) -> str | None:
        """The job's status, or ``None`` when it does not exist."""
        value = self.redis.hget(keys.job(job_id), "status")
        return value.decode() if value is not None else None

    def mark_running(self, job_id: str, now_ms: int) -> tuple[int, int]:
        """Record the start of an attempt.

        :return: the attempt number (1 = first) and when the first attempt started.
        """
        pipe = self.redis.pipeline()
        pipe.hset(keys.job(job_id), "status", "running")
        pipe.hsetnx(keys.job(job_id), "started_ms", now_ms)
        pipe.hincrby(keys.job(job_id), "attempts", 1)
        pipe.hget(keys.job(job_id), "started_ms")
        _, _, attempt, started = pipe.execute()
        return int(attempt), int(started)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was requested for the job."""
        return bool(self.redis.hexists(keys.job(job_id), "cancel"))

    def request_cancel(self, job_id: str) -> bool:
        """Flag a job for cancellation; return whether the job exists."""
        return bool(self._cancel(keys=[keys.job(job_id)]))

    def take_lease(self, job_id: str, token: str, ttl_ms: int) -> bool:
        """Take or renew the generation lease; return whether ``token`` holds it."""
        return bool(self._lease(keys=[keys.lease(job_id)], args=[token, ttl_ms]))

    def release_lease(self, job_id: str, token: str) -> None:
        """Give the lease back if ``token`` holds it."""
        self._release(keys=[keys.lease(job_id)], args=[token])

    def advance_session(self, session: str, job_id: str) -> str | None:
        """Pop a finished job off its session; return the next job to start, if any."""
        nxt = self._advance(keys=[keys.session(session)], args=[job_id])
        return nxt.decode() if nxt else None
