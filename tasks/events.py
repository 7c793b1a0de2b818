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
from collections import deque
from dataclasses import dataclass
from typing import Any

import gevent
import redis
from gevent.event import AsyncResult, Event

from tasks import keys

TERMINAL = frozenset({"done", "error"})

# Append one event to a job's log and wake its listeners.
# KEYS[1] job hash, KEYS[2] log stream, KEYS[3] wake channel, KEYS[4] lease,
# KEYS[5] running zset
# ARGV[1] frame text before the seq, ARGV[2] frame text after the seq,
# ARGV[3] lease token ('' skips the check), ARGV[4] final status ('' unless the
#   event ends the job), ARGV[5] TTL in seconds for a job that has ended,
# ARGV[6] the seq the caller expects to get ('' skips the check).
# Returns {seq, cancel_requested}; {-1, 0} when the caller's lease is gone
# (another attempt owns the job: the caller must stop writing); {-2, 0} when
# the log is not where the caller expects it.  An append retried after its
# reply was lost finds the log one past what it expects and returns that seq
# again instead of appending twice.
APPEND = """
if ARGV[3] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[3] then
  return {-1, 0}
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local cancel = redis.call('HGET', KEYS[1], 'cancel') and 1 or 0
if ARGV[6] ~= '' and seq ~= tonumber(ARGV[6]) then
  if seq == tonumber(ARGV[6]) + 1 then return {seq - 1, cancel} end
  return {-2, 0}
end
redis.call('HSET', KEYS[1], 'seq', seq + 1)
local frame = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'f', frame)
redis.call('PUBLISH', KEYS[3], seq .. ' ' .. frame)
if ARGV[4] ~= '' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'status', ARGV[4],
             'finished_ms', t[1] * 1000 + math.floor(t[2] / 1000))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('ZREM', KEYS[5], string.sub(KEYS[1], -32))
elseif seq == 0 then
  redis.call('EXPIRE', KEYS[2], redis.call('TTL', KEYS[1]))
end
return {seq, cancel}
"""


class LeaseLostError(RuntimeError):
    """Another attempt owns the job; this one must stop writing."""


class LogMismatchError(RuntimeError):
    """The log is not at the seq the writer expected (a bug, or a writer without the lease)."""


@dataclass(frozen=True)
class Appended:
    """What one append reports back to the writer."""

    seq: int
    cancel_requested: bool


class EventLog:
    """Appends to and replays job event logs.

    Example::

        log = EventLog(redis.Redis.from_url(url), ttl_s=3600)
        log.append(job_id, "token", {"text": "Hello"})
        for seq, frame in log.read(job_id, after=-1):
            ...
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._append = client.register_script(APPEND)

    def append(self, job_id: str, kind: str, body: dict[str, Any], *,
               lease_token: str = "", status: str = "", expect_seq: int | None = None
               ) -> Appended:
        """Append one event and publish its wake-up.

        :param kind: ``token``, ``restart``, ``done`` or ``error``.
        :param body: the frame's fields besides ``type``, ``job_id`` and ``seq``.
        :param lease_token: when given, append only while this lease is held.
        :param status: the job's final status when this event ends the job.
        :param expect_seq: the seq this event must get; makes a retried append
            (after a lost reply) safe.
        :return: the event's seq and whether a cancel was requested.
        :raises LeaseLostError: the lease is held by someone else.
        :raises LogMismatchError: the log is not at ``expect_seq``.
        """
        keys_, args = self.call(job_id, kind, body, lease_token, status, expect_seq)
        return self.reply(job_id, expect_seq, self._append(keys=keys_, args=args))

    def call(self, job_id: str, kind: str, body: dict[str, Any], lease_token: str,
             status: str, expect_seq: int | None) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of one append (see :meth:`append`)."""
        head, tail = frame_parts(job_id, kind, body)
        return ([keys.job(job_id), keys.log(job_id), keys.wake(job_id), keys.lease(job_id),
                 keys.RUNNING],
                [head, tail, lease_token, status, self.ttl_s,
                 "" if expect_seq is None else expect_seq])

    @staticmethod
    def reply(job_id: str, expect_seq: int | None, raw: Any) -> Appended:
        """Interpret the append script's reply (see :meth:`append` for what it raises)."""
        seq, cancel = raw
        if seq == -1:
            raise LeaseLostError(job_id)
        if seq == -2:
            raise LogMismatchError(f"job {job_id}: the log is not at seq {expect_seq}")
        return Appended(int(seq), bool(cancel))

    def read(self, job_id: str, after: int = -1, count: int | None = None) -> list[tuple[int, str]]:
        """Return the events with ``seq > after`` as ``(seq, frame)`` pairs, in order."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(  # type: ignore[assignment]
            keys.log(job_id), f"0-{after + 2}", "+", count=count)
        return [(entry_seq(eid), fields[b"f"].decode()) for eid, fields in entries]

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
    TIMEOUT_S = 30.0

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.queue: deque[tuple[str, int | None, list[str], list[Any], AsyncResult]] = deque()
        self.wakeup = Event()
        self.sender: gevent.Greenlet | None = None

    def append(self, job_id: str, kind: str, body: dict[str, Any], *,
               lease_token: str = "", status: str = "", expect_seq: int | None = None
               ) -> Appended:
        """Like :meth:`EventLog.append`; raises what it raises, and ``redis.RedisError``."""
        keys_, args = self.log.call(job_id, kind, body, lease_token, status, expect_seq)
        result: AsyncResult = AsyncResult()
        self.queue.append((job_id, expect_seq, keys_, args, result))
        self.wakeup.set()
        if self.sender is None or self.sender.dead:
            self.sender = gevent.spawn(self._send)
        try:
            appended: Appended = result.get(timeout=self.TIMEOUT_S)
        except gevent.Timeout as e:
            raise redis.TimeoutError(f"append of job {job_id} got no reply") from e
        return appended

    def _send(self) -> None:
        script = self.log._append
        while True:
            if not self.queue:
                self.wakeup.clear()
                self.wakeup.wait()
                continue
            batch = [self.queue.popleft()
                     for _ in range(min(len(self.queue), self.MAX_BATCH))]
            try:
                replies = self._execute(script, batch)
            except Exception as e:  # noqa: BLE001 - every waiting writer must hear of it
                failure = e if isinstance(e, redis.RedisError) else redis.RedisError(repr(e))
                for *_, result in batch:
                    result.set_exception(failure)
                continue
            for (job_id, expect_seq, _, _, result), raw in zip(batch, replies, strict=True):
                try:
                    result.set(EventLog.reply(job_id, expect_seq, raw))
                except (LeaseLostError, LogMismatchError) as e:
                    result.set_exception(e)

    def _execute(self, script: Any, batch: list[Any]) -> list[Any]:
        # EVALSHA directly: a pipeline running Script objects would first ask
        # SCRIPT EXISTS, one more round trip per batch.
        for attempt in range(2):
            pipe = self.log.redis.pipeline(transaction=False)
            for _, _, keys_, args, _ in batch:
                pipe.evalsha(script.sha, len(keys_), *keys_, *args)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self.log.redis.script_load(script.script)  # Redis restarted
        raise AssertionError("unreachable")


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
