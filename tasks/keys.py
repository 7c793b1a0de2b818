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
sluice:session:{s}            list      job ids of a chat session, head = running
sluice:running                zset      job id -> lease deadline (ms) of running jobs
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


def session(name: str) -> str:
    """The ordered list of a chat session's unfinished jobs."""
    return f"{PREFIX}session:{name}"


#: Jobs being generated, scored by when their lease runs out; a job whose
#: deadline passed lost its worker and is re-enqueued by the reaper.
RUNNING = f"{PREFIX}running"

WAKE_PREFIX = f"{PREFIX}job:"
WAKE_SUFFIX = ":wake"


def job_id_of_wake(channel: str) -> str:
    """Invert :func:`wake`."""
    return channel[len(WAKE_PREFIX):-len(WAKE_SUFFIX)]
