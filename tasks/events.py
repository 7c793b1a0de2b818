"""The per-job event log: a gap-free, replayable sequence of wire frames.

Each event is stored already rendered as the JSON text frame a client
receives, so relaying a token costs the front end no JSON work.  ``seq`` is
allocated inside the append script, which is the only writer, so the log has
no gaps and no duplicates whatever the number of workers.  The stream entry
id of event ``seq`` is ``0-(seq+1)``: reading "after seq n" is an XRANGE from
``0-(n+2)``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import redis

from tasks import keys
from tasks.budget import SETTLE_FUNCTION, Bill
from tasks.coalesce import Coalescer, run_scripts
from tasks.routing import RELEASE_FUNCTION

TERMINAL = frozenset({"done", "error"})

# Append one event to a job's log and wake its listeners (a Lua function, so
# that FINISH can settle in the same call).
# job hash, log stream, wake channel, lease, unstarted-jobs zset; frame text
# before the seq, frame text after the seq; lease token ('' skips the check);
# final status ('' unless the event ends the job); TTL in seconds for a job
# that has ended; the seq the caller expects to get ('' skips the check).
# Returns {seq, cancel_requested, appended}; {-1, 0, 0} when the caller's lease
# is gone (another attempt owns the job: the caller must stop writing);
# {-2, 0, 0} when the log is not where the caller expects it.  An append
# retried after its reply was lost finds the log one past what it expects and
# returns that seq again instead of appending twice (appended is 0 then, 1
# when this call appended).  An ended job stays in the running zset until its
# attempt releases the lease, so the reaper finishes the job's housekeeping
# (its chat session) if the worker dies in between (a job without a session
# has none: FINISH may end its lease at once); an ended job leaves the
# unstarted index (it ended without starting: refused, cancelled).
APPEND_FUNCTION = """
local function append(job, log, wake, lease, unstarted, head, tail, token, status, ttl, expect)
  if token ~= '' and redis.call('GET', lease) ~= token then return {-1, 0, 0} end
  local seq = tonumber(redis.call('HGET', job, 'seq') or '0')
  local cancel = redis.call('HGET', job, 'cancel') and 1 or 0
  if expect ~= '' and seq ~= tonumber(expect) then
    if seq == tonumber(expect) + 1 then return {seq - 1, cancel, 0} end
    return {-2, 0, 0}
  end
  redis.call('HSET', job, 'seq', seq + 1)
  local frame = head .. seq .. tail
  redis.call('XADD', log, '0-' .. (seq + 1), 'f', frame)
  redis.call('PUBLISH', wake, seq .. ' ' .. frame)
  if status ~= '' then
    local t = redis.call('TIME')
    redis.call('HSET', job, 'status', status,
               'finished_ms', t[1] * 1000 + math.floor(t[2] / 1000))
    redis.call('EXPIRE', job, ttl)
    redis.call('EXPIRE', log, ttl)
    redis.call('ZREM', unstarted, string.sub(job, -32))
  elseif seq == 0 then
    redis.call('EXPIRE', log, redis.call('TTL', job))
  end
  return {seq, cancel, 1}
end
"""

# Append one event (see APPEND_FUNCTION).
# KEYS[1] job hash, KEYS[2] log stream, KEYS[3] wake channel, KEYS[4] lease,
# KEYS[5] unstarted-jobs zset
# ARGV[1] frame text before the seq, ARGV[2] frame text after the seq,
# ARGV[3] lease token, ARGV[4] final status, ARGV[5] TTL s once ended,
# ARGV[6] expected seq.
# Returns {seq, cancel_requested}, {-1, 0} or {-2, 0} (see APPEND_FUNCTION).
APPEND = APPEND_FUNCTION + """
local out = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3],
                   ARGV[4], ARGV[5], ARGV[6])
return {out[1], out[2]}
"""

# Append the event that ends a job and settle the job's reservation, in one
# call: no crash can come between the end of a job and its settlement, and a
# retried call settles nothing twice (the reservation is gone).  So that a
# job's end is one round trip, the same call may also
# * fill in the client TTFT the front end recorded on the job (HSETNX) where
#   the frame's text has a slot for it: the frame is ARGV[2] .. value ..
#   ARGV[14] after the seq.  The value is written as Python's json would write
#   float(stored): a decimal as stored, an integer with '.0', another number
#   with %.17g (equal once parsed); null when absent or not a finite number;
# * end the successful provider request of the job on its deployment
#   (tasks/routing.py RELEASE_FUNCTION), only when this call appended: a
#   retried call finds it made;
# * end the lease (ARGV[12] = '1', only for a job without a chat session,
#   whose end needs no housekeeping): drop it and the job's entry in the
#   running zset, and note on the job which token ended it (ended_by), so that
#   a retried call, which finds the lease gone, is known for a repeat.
# KEYS[1..5] as APPEND; KEYS[6] reservation hash, KEYS[7] bucket hash,
# KEYS[8] slots zset, KEYS[9] usage hash (today), all of the job's owner;
# KEYS[10] running zset; KEYS[11..14] the request's deployment keys (none: no
# request to end).
# ARGV[1..6] as APPEND; ARGV[7] the owner's key id, ARGV[8] job id, ARGV[9]
# prompt tokens used ('' = as counted at admission), ARGV[10] completion
# tokens used, ARGV[11] usage TTL s; ARGV[12] '1' = end the lease;
# ARGV[13] '1' = fill in the client TTFT; ARGV[14] frame text after the slot;
# ARGV[15..29] the arguments of RELEASE_FUNCTION (with KEYS[11..14]).
# Returns {seq, cancel_requested, settled}: settled is 1 if this call settled
# the job, 0 if there was nothing to settle (settled before, or never
# reserved), -1 if the reservation belongs to another key (left alone).
# {-1, 0, 0} / {-2, 0, 0} as APPEND: nothing written, nothing settled.
FINISH = APPEND_FUNCTION + SETTLE_FUNCTION + RELEASE_FUNCTION + """
local tail = ARGV[2]
if ARGV[13] == '1' then
  local v = redis.call('HGET', KEYS[1], 'client_ttft_ms')
  local n = v and tonumber(v)
  if not n or n ~= n or n == math.huge or n == -math.huge then
    v = 'null'
  elseif string.find(v, '^%-?%d+$') then
    v = v .. '.0'
  elseif not string.find(v, '^%-?%d+%.%d+$') then
    v = string.format('%.17g', n)
  end
  tail = tail .. v .. ARGV[14]
end
local out = append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tail, ARGV[3],
                   ARGV[4], ARGV[5], ARGV[6])
if out[1] == -1 and ARGV[12] == '1' and ARGV[6] ~= ''
   and redis.call('HGET', KEYS[1], 'ended_by') == ARGV[3]
   and tonumber(redis.call('HGET', KEYS[1], 'seq')) == tonumber(ARGV[6]) + 1 then
  return {tonumber(ARGV[6]), 0, 0}
end
if out[1] < 0 then return {out[1], 0, 0} end
if out[3] == 1 then
  if #KEYS > 10 then
    release_route({KEYS[11], KEYS[12], KEYS[13], KEYS[14]}, {unpack(ARGV, 15, 29)})
  end
  if ARGV[12] == '1' and ARGV[3] ~= '' then
    redis.call('DEL', KEYS[4])
    redis.call('ZREM', KEYS[10], ARGV[8])
    redis.call('HSET', KEYS[1], 'ended_by', ARGV[3])
  end
end
local owner = redis.call('HGET', KEYS[6], 'key_id')
if not owner then return {out[1], out[2], 0} end
if owner ~= ARGV[7] then return {out[1], out[2], -1} end
settle(KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
return {out[1], out[2], 1}
"""


def new_slot() -> str:
    """A value to put in an event's body where FINISH is to fill in a figure (see append).

    Random, so that no other text of the frame (a provider's finish reason…) can pass for it.
    """
    return f"\x00slot:{secrets.token_hex(8)}"


class LeaseLostError(RuntimeError):
    """Another attempt owns the job; this one must stop writing."""


class LogMismatchError(RuntimeError):
    """The log is not at the seq the writer expected (a bug, or a writer without the lease)."""


@dataclass(frozen=True)
class Appended:
    """What one append reports back to the writer."""

    seq: int
    cancel_requested: bool
    #: For an append that ended the job with a bill: 1 if it settled the job,
    #: 0 if there was nothing to settle, -1 if the reservation is another key's.
    settled: int | None = None


@dataclass(frozen=True)
class Ending:
    """What else the call that ends a job does (see :data:`FINISH`), to spare round trips."""

    #: End the job's lease with the job (and its entry in the running zset):
    #: only for a job without a chat session, and with ``lease_token``.
    lease: bool = False
    #: The value (from :func:`new_slot`) standing in the event's body for the
    #: client TTFT that FINISH reads from the job and fills in (null if none).
    client_ttft_slot: str = ""
    #: The KEYS and ARGV of the job's provider request to end
    #: (:meth:`tasks.routing.Router.release_call`), when this call appends.
    route: tuple[list[str], list[Any]] | None = None


class EventLog:
    """Appends to and replays job event logs.

    Example::

        log = EventLog(redis.Redis.from_url(url), ttl_s=3600)
        log.append(job_id, "token", {"text": "Hello"})
        for seq, frame in log.read(job_id, after=-1):
            ...
    """

    def __init__(self, client: redis.Redis, ttl_s: int, *, batch_reads: bool = False) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._reads: Coalescer[tuple[str, int]] | None = \
            Coalescer(self._read_batch, max_batch=256) if batch_reads else None
        self._append = client.register_script(APPEND)
        self._finish = client.register_script(FINISH)

    def append(self, job_id: str, kind: str, body: dict[str, Any], *,
               lease_token: str = "", status: str = "", expect_seq: int | None = None,
               bill: Bill | None = None, end: Ending | None = None) -> Appended:
        """Append one event and publish its wake-up.

        :param kind: ``token``, ``restart``, ``done`` or ``error``.
        :param body: the frame's fields besides ``type``, ``job_id`` and ``seq``.
        :param lease_token: when given, append only while this lease is held.
        :param status: the job's final status when this event ends the job.
        :param expect_seq: the seq this event must get; makes a retried append
            (after a lost reply) safe.
        :param bill: with ``status``, settle the job's reservation with it in
            the same Redis call (exactly once, see :data:`FINISH`).
        :param end: with ``bill``, more of the job's end to do in the same call
            (see :class:`Ending`).
        :return: the event's seq, whether a cancel was requested, and whether it settled.
        :raises LeaseLostError: the lease is held by someone else.
        :raises LogMismatchError: the log is not at ``expect_seq``.
        """
        script, keys_, args = self.call(job_id, kind, body, lease_token, status, expect_seq,
                                        bill, end)
        return self.reply(job_id, expect_seq, script(keys=keys_, args=args))

    def call(self, job_id: str, kind: str, body: dict[str, Any], lease_token: str,
             status: str, expect_seq: int | None, bill: Bill | None = None,
             end: Ending | None = None) -> tuple[Any, list[str], list[Any]]:
        """The script, KEYS and ARGV of one append (see :meth:`append`)."""
        head, tail = frame_parts(job_id, kind, body)
        keys_ = [keys.job(job_id), keys.log(job_id), keys.wake(job_id), keys.lease(job_id),
                 keys.UNSTARTED]
        args: list[Any] = [head, tail, lease_token, status, self.ttl_s,
                           "" if expect_seq is None else expect_seq]
        if bill is None:
            if end is not None:
                raise ValueError(f"job {job_id}: only an event that settles ends more")
            return self._append, keys_, args
        if not status:
            raise ValueError(f"job {job_id}: only the event that ends a job settles it")
        keys_ += [*bill.keys(job_id), keys.RUNNING]
        args += [bill.key_id, *bill.args(job_id)]
        if end is None:
            return self._finish, keys_, [*args, 0, 0, ""]
        after = ""
        if end.client_ttft_slot:
            args[1], found, after = tail.partition(
                json.dumps(end.client_ttft_slot, ensure_ascii=False))
            if not found:
                raise ValueError(f"job {job_id}: no client TTFT slot in the {kind} event")
        args += [1 if end.lease else 0, 1 if end.client_ttft_slot else 0, after]
        if end.route is not None:
            keys_ += end.route[0]
            args += end.route[1]
        return self._finish, keys_, args

    @staticmethod
    def reply(job_id: str, expect_seq: int | None, raw: Any) -> Appended:
        """Interpret the append script's reply (see :meth:`append` for what it raises)."""
        seq, cancel, *settled = raw
        if seq == -1:
            raise LeaseLostError(job_id)
        if seq == -2:
            raise LogMismatchError(f"job {job_id}: the log is not at seq {expect_seq}")
        return Appended(int(seq), bool(cancel), int(settled[0]) if settled else None)

    def read(self, job_id: str, after: int = -1, count: int | None = None) -> list[tuple[int, str]]:
        """Return the events with ``seq > after`` as ``(seq, frame)`` pairs, in order.

        With ``batch_reads`` (a front end: every socket catches up here),
        reads made while one is in flight go to Redis together, in one pipeline.
        """
        if self._reads is not None and count is None:
            events: list[tuple[int, str]] = self._reads.call(
                (job_id, after), what=f"reading job {job_id}'s log")
            return events
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(  # type: ignore[assignment]
            keys.log(job_id), f"0-{after + 2}", "+", count=count)
        return _events(entries)

    def _read_batch(self, batch: list[tuple[str, int]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id, after in batch:
            pipe.xrange(keys.log(job_id), f"0-{after + 2}", "+")
        return [entries if isinstance(entries, Exception) else _events(entries)
                for entries in pipe.execute(raise_on_error=False)]

    def exists(self, job_id: str) -> bool:
        """Whether the job's record is still in Redis (it may have expired)."""
        return bool(self.redis.exists(keys.job(job_id)))


class AppendBatcher:
    """Sends the appends of every attempt in a worker process through one pipeline.

    Each attempt waits for its own append before making the next, so a batch
    holds at most one event per job and order within a job is kept.  Under
    load, one round trip (and one connection checkout) carries many jobs'
    tokens instead of one.

    Example::

        batcher = AppendBatcher(EventLog(client, ttl_s=3600))
        batcher.append(job_id, "token", {"text": "Hi"}, lease_token=t, expect_seq=4)
    """

    MAX_BATCH = 256

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.coalescer: Coalescer[tuple[str, int | None, Any, list[str], list[Any]]] = \
            Coalescer(self._run, self.MAX_BATCH)

    def append(self, job_id: str, kind: str, body: dict[str, Any], *,
               lease_token: str = "", status: str = "", expect_seq: int | None = None,
               bill: Bill | None = None, end: Ending | None = None) -> Appended:
        """Like :meth:`EventLog.append`; raises what it raises, and ``redis.RedisError``."""
        script, keys_, args = self.log.call(job_id, kind, body, lease_token, status,
                                            expect_seq, bill, end)
        appended: Appended = self.coalescer.call((job_id, expect_seq, script, keys_, args),
                                                 f"append of job {job_id}")
        return appended

    def _run(self, batch: list[tuple[str, int | None, Any, list[str], list[Any]]]
             ) -> list[Appended | Exception]:
        # Safe to run again whole after NOSCRIPT: every append names its seq.
        raws = run_scripts(self.log.redis, [(script, keys_, args)
                                            for _, _, script, keys_, args in batch])
        replies: list[Appended | Exception] = []
        for (job_id, expect_seq, *_), raw in zip(batch, raws, strict=True):
            try:
                replies.append(EventLog.reply(job_id, expect_seq, raw))
            except (LeaseLostError, LogMismatchError) as e:
                replies.append(e)
        return replies


def _events(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[int, str]]:
    return [(entry_seq(eid), fields[b"f"].decode()) for eid, fields in entries]


def entry_seq(entry_id: bytes | str) -> int:
    """The seq of a stream entry id ``0-(seq+1)``."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(eid.partition("-")[2]) - 1


def frame_parts(job_id: str, kind: str, body: dict[str, Any]) -> tuple[str, str]:
    """Render a frame as the text before and after its seq number."""
    head = f'{{"type":"{kind}","job_id":"{job_id}","seq":'
    rest = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    tail = "," + rest[1:] if len(rest) > 2 else "}"
    return head, tail


def frame_kind(frame: str) -> str:
    """The ``type`` of a rendered frame, read without parsing the JSON."""
    return frame[9:frame.index('"', 9)]
