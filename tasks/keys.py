"""Every Redis key and channel Sluice uses, on one screen.

All names sit under one prefix.  Per-job keys expire: the job record and its
event log get ``job_timeout_s + event_ttl_s`` at creation and ``event_ttl_s``
once the job ends; the lease lives ``lease_ttl_s`` past its last heartbeat.

============================  ========  ==============================================
key                           type      holds
============================  ========  ==============================================
sluice:job:{id}               hash      params, owner, status, timestamps, seq counter
sluice:job:{id}:log           stream    the job's events; entry id ``0-(seq+1)``
sluice:job:{id}:lease         string    token of the worker generating it (SET NX)
sluice:job:{id}:wake          channel   one message per appended event
sluice:session:{key}:{s}      list      job ids of a key's chat session, head = running
sluice:running                zset      job id -> lease deadline (ms) of running jobs
sluice:cancels                channel   ids of jobs whose cancel was just requested
sluice:relay:{uuid}           channel   a front end's own channel; keeps its pub/sub alive
sluice:revoked                channel   ids of API keys just revoked; front ends close their sockets
============================  ========  ==============================================

Admission control (API keys, token buckets, usage).  API keys live until
revoked and deleted by an operator; every other admission key expires: a
bucket once it would be full again, a key's slot set after its last slot
deadline, a reservation with its job, a usage day after ``usage_ttl_s``.

============================  ========  ==============================================
key                           type      holds
============================  ========  ==============================================
sluice:apikey:{kid}           hash      sha256 of the key, tier, name, created_ms, state
sluice:apikeys                zset      key id -> created ms, for listing
sluice:bucket:{kid}           hash      token and request levels, last refill (µs)
sluice:slots:{kid}            zset      job id -> slot deadline (ms) of admitted jobs
sluice:frames:{kid}           hash      the key's client-frame bucket: level, last refill (µs)
sluice:job:{id}:reservation   hash      key id, tokens reserved, bucket figures
sluice:usage:{kid}:{day}      hash      requests, rejected, prompt/completion tokens
============================  ========  ==============================================
"""

from __future__ import annotations

PREFIX = "sluice:"


def job(job_id: str) -> str:
    """The job record hash."""
    return f"{PREFIX}job:{job_id}"


def log(job_id: str) -> str:
    """The job's event stream."""
    return f"{PREFIX}job:{job_id}:log"


def lease(job_id: str) -> str:
    """The job's generation lease."""
    return f"{PREFIX}job:{job_id}:lease"


def wake(job_id: str) -> str:
    """The pub/sub channel announcing the job's new events."""
    return f"{PREFIX}job:{job_id}:wake"


def session(owner: str, name: str) -> str:
    """The ordered list of a chat session's unfinished jobs; sessions are per API key."""
    return f"{PREFIX}session:{owner}:{name}"


#: Jobs being generated, scored by when their lease runs out; a job whose
#: deadline passed lost its worker and is re-enqueued by the reaper.
RUNNING = f"{PREFIX}running"

#: Workers listen here to stop a cancelled generation at once, wherever it waits.
CANCELS = f"{PREFIX}cancels"

#: Every front end listens here to close the sockets of a key the moment it is revoked.
REVOKED = f"{PREFIX}revoked"


def relay_channel(process_id: str) -> str:
    """A channel only one front-end process subscribes to, so its pub/sub is never empty."""
    return f"{PREFIX}relay:{process_id}"


WAKE_PREFIX = f"{PREFIX}job:"
WAKE_SUFFIX = ":wake"


def job_id_of_wake(channel: str) -> str:
    """Invert :func:`wake`."""
    return channel[len(WAKE_PREFIX):-len(WAKE_SUFFIX)]


# -- admission control ------------------------------------------------------

#: API key ids by creation time, for ``sluice keys list``.
API_KEYS = f"{PREFIX}apikeys"


def api_key(key_id: str) -> str:
    """An API key's record: its hash, tier, name and state (never the key itself)."""
    return f"{PREFIX}apikey:{key_id}"


def bucket(key_id: str) -> str:
    """The token and request buckets of an API key."""
    return f"{PREFIX}bucket:{key_id}"


def slots(key_id: str) -> str:
    """The concurrency slots held by an API key's admitted, unsettled jobs."""
    return f"{PREFIX}slots:{key_id}"


def frames(key_id: str) -> str:
    """The bucket of client frames all sockets of an API key draw from."""
    return f"{PREFIX}frames:{key_id}"


def reservation(job_id: str) -> str:
    """A job's token reservation; deleting it is what settles the job exactly once."""
    return f"{PREFIX}job:{job_id}:reservation"


def usage(key_id: str, day: str) -> str:
    """An API key's usage counters for one UTC day (``YYYY-MM-DD``)."""
    return f"{PREFIX}usage:{key_id}:{day}"
