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
sluice:unstarted              zset      job id -> ms sent (or backed off to): sent, never started
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
sluice:admitted               zset      job id -> ms admitted, for ``admitted_grace_s``
sluice:usage:{kid}:{day}      hash      requests, rejected, prompt/completion tokens
============================  ========  ==============================================

Bulk and batch items (:mod:`tasks.bulk_store`).  A bulk's keys expire
``bulk_max_wait_s + batch_retention_s`` after submission and
``batch_retention_s`` after it ends; an item's job id is its bulk id and its
index, so it needs no key of its own until it starts.

============================  ========  ==============================================
key                           type      holds
============================  ========  ==============================================
sluice:bulk:{bid}             hash      owner, tier, kind, cursor, counts, status, times
sluice:bulk:{bid}:specs       hash      item index -> its job spec, until it starts
sluice:bulk:{bid}:refs        hash      item index -> the client's ref or custom_id
sluice:bulk:{bid}:results     hash      item index -> its outcome (batches only)
sluice:bulk:{bid}:skip        set       indexes of items cancelled before they started
sluice:hold:{kid}             zset      bulk id -> ticket: a key's bulks with held items
sluice:hold                   zset      key id -> not-before ms: keys with held items
sluice:hold:ticket            string    counter giving bulks their submission order
sluice:bulk:running           zset      job id -> claim ms: started items not yet ended
sluice:bulk:keyrunning        hash      key id -> its started items not yet ended
sluice:bulk:pending           hash      key id -> its items submitted and not yet ended
sluice:bulk:finished          zset      bulk id -> ms: ended bulks whose end is not yet told
sluice:bulk:starts:{kid}      list      ms of the key's latest item starts (for ETAs)
sluice:bulk:wake              channel   wakes the pump: a submission, a cancel, an end
sluice:pump                   string    token of the worker process that pumps
sluice:file:{fid}             hash      an uploaded (or rendered) file: owner, name, size
sluice:file:{fid}:content     string    the file's bytes
sluice:batch:{bid}            hash      a batch's own fields (status, counts: its bulk)
sluice:batch:{bid}:render     string    held by the front end rendering its result files
sluice:batches:{kid}          zset      batch id -> created ms: a key's batches
============================  ========  ==============================================

Provider deployments (:mod:`tasks.routing`).  Shared by every worker, so all
route with one picture; each key expires on its own: a deployment's state
``STATE_TTL_S`` after its last job, its in-flight set ``job_timeout_s`` after
its last start (each entry has its own deadline too), a cooldown and a failure
count after their ``PX``.

============================  ========  ==============================================
key                           type      holds
============================  ========  ==============================================
sluice:dep:{name}             hash      minute, tokens and requests this minute, TTFT
                                        EWMA (ms), provider-reported remaining tokens
sluice:dep:{name}:inflight    zset      job id -> deadline (ms) of its running request
sluice:dep:{name}:cooldown    string    why it rests; PX = until when
sluice:dep:{name}:fails       string    failures in the current window; PX = window
sluice:queues                 zset      Celery queue -> ms until which a worker consumes it
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


#: Jobs whose broker message was sent and which no attempt has started yet,
#: scored by when it was sent (ms; later when the reaper backs off): a message
#: taken by a worker killed before it leased its job is sent again from here.
UNSTARTED = f"{PREFIX}unstarted"


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


#: Jobs just admitted, scored by when (ms): a job whose record was never
#: stored (its front end died between admission and storing it) is found
#: here by the reaper and its reservation and slot refunded.
ADMITTED = f"{PREFIX}admitted"


def usage(key_id: str, day: str) -> str:
    """An API key's usage counters for one UTC day (``YYYY-MM-DD``)."""
    return f"{PREFIX}usage:{key_id}:{day}"


# -- bulk and batch items ---------------------------------------------------

def bulk(bulk_id: str) -> str:
    """A bulk's record: owner, tier, cursor, counts, status."""
    return f"{PREFIX}bulk:{bulk_id}"


def bulk_specs(bulk_id: str) -> str:
    """A bulk's item specs by index, each deleted when its item starts."""
    return f"{PREFIX}bulk:{bulk_id}:specs"


def bulk_refs(bulk_id: str) -> str:
    """A bulk's item refs (a socket's ``ref``, a batch line's ``custom_id``) by index."""
    return f"{PREFIX}bulk:{bulk_id}:refs"


def bulk_results(bulk_id: str) -> str:
    """A bulk's item outcomes by index (kept for batches)."""
    return f"{PREFIX}bulk:{bulk_id}:results"


def bulk_skip(bulk_id: str) -> str:
    """Indexes of a bulk's items cancelled before they started."""
    return f"{PREFIX}bulk:{bulk_id}:skip"


def hold(key_id: str) -> str:
    """A key's bulks that still hold items, scored by submission order."""
    return f"{PREFIX}hold:{key_id}"


#: Keys with held items, scored by when the pump may next try to start one (ms).
HOLD = f"{PREFIX}hold"
#: The counter that orders bulks by submission.
HOLD_TICKET = f"{PREFIX}hold:ticket"
#: Started bulk items not yet ended (job id -> claim ms); the pump watches them end.
BULK_RUNNING = f"{PREFIX}bulk:running"
#: Per key id: its started bulk items not yet ended.
BULK_KEY_RUNNING = f"{PREFIX}bulk:keyrunning"
#: Per key id: its bulk items submitted and not yet ended.
BULK_PENDING = f"{PREFIX}bulk:pending"
#: Bulks that ended and whose ``bulk_done`` is not yet in their log.
BULK_FINISHED = f"{PREFIX}bulk:finished"
#: Wakes the pump: a bulk was submitted or cancelled, or an item's job ended.
BULK_WAKE = f"{PREFIX}bulk:wake"
#: The pump's lock: the token of the worker process that pumps.
PUMP = f"{PREFIX}pump"


def bulk_starts(key_id: str) -> str:
    """When the key's latest bulk items started (ms), newest first."""
    return f"{PREFIX}bulk:starts:{key_id}"


def file(file_id: str) -> str:
    """A Batch API file's record."""
    return f"{PREFIX}file:{file_id}"


def file_content(file_id: str) -> str:
    """A Batch API file's bytes."""
    return f"{PREFIX}file:{file_id}:content"


def batch(bulk_id: str) -> str:
    """A batch's own fields (endpoint, metadata, line errors, timestamps)."""
    return f"{PREFIX}batch:{bulk_id}"


def batch_render(bulk_id: str) -> str:
    """Held (with a TTL) by the front end that renders a batch's result files."""
    return f"{PREFIX}batch:{bulk_id}:render"


def batches(key_id: str) -> str:
    """A key's batches by creation time, for listing."""
    return f"{PREFIX}batches:{key_id}"


# -- provider deployments ---------------------------------------------------

def deployment(name: str) -> str:
    """A deployment's routing state: tokens and requests this minute, moving TTFT."""
    return f"{PREFIX}dep:{name}"


def deployment_inflight(name: str) -> str:
    """The jobs a deployment is serving now, scored by their deadline (ms)."""
    return f"{PREFIX}dep:{name}:inflight"


def deployment_cooldown(name: str) -> str:
    """Present while a deployment cools down; expires when it may serve again."""
    return f"{PREFIX}dep:{name}:cooldown"


def deployment_fails(name: str) -> str:
    """A deployment's failures within the current failure window."""
    return f"{PREFIX}dep:{name}:fails"


#: Celery queues with a consumer: queue -> ms until which some worker said it consumes it.
QUEUES = f"{PREFIX}queues"
