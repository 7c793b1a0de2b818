"""Bulks in Redis: their held items, in submission order, and their counts.

A *bulk* is a set of items one API key submitted at once (a socket's ``bulk``
frame, or a Batch API batch).  Each item becomes an ordinary job when the pump
starts it; until then it is *held*: its spec waits in the bulk's specs hash,
and the bulk waits in its key's hold queue behind the key's earlier bulks.
Item ``i`` of bulk ``b`` has the job id ``b + '%08x' % i``, so an item needs
no key of its own, and a client can follow its job from the moment it is
submitted.

A bulk's ``cursor`` is the index of its next item to start; items start in
order.  Counts: ``started`` (jobs created), ``ended`` (of those, ended),
``done``, ``failed``, ``cancelled`` (cancelled or expired, started or not)
and ``skipped`` (cancelled held items not yet passed by the cursor).  The bulk
ends when ``done + failed + cancelled == total``.

Every change is one Lua call, so two pumps overlapping for a moment (a
take-over) can neither start an item twice nor count its end twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import gevent
import redis

from tasks import keys
from tasks.jobs import JobSpec

#: An item's job id is its bulk id (24 hex digits) and its index (8).
BULK_ID_HEX = 24
#: The index whose "job" is the bulk's own event log (``held``, ``bulk_done``).
LOG_INDEX = 0xFFFFFFFF
#: Statuses of a bulk that has not ended; it ends as completed, cancelled or expired.
LIVE = frozenset({"active", "cancelling", "expiring"})

# Helpers prepended to the scripts below.  A script's first five keys are
# always the bulk's: record, specs, refs, results, skip.
_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function decr(hash, field, by)
  if redis.call('HINCRBY', hash, field, -by) <= 0 then redis.call('HDEL', hash, field) end
end
local function unhold(hold, all_held, bid, owner)
  redis.call('ZREM', hold, bid)
  if redis.call('EXISTS', hold) == 0 then redis.call('ZREM', all_held, owner) end
end
-- End the bulk if every item has ended: its final status, end time, the
-- retention TTL on its keys, and a note in the finished set.  Returns 1 if it ended.
local FINAL = {active = 'completed', cancelling = 'cancelled', expiring = 'expired'}
local function finish_if_done(finished, bid, retention)
  local b = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'cancelled', 'status')
  local status = FINAL[b[5]]
  if not status or tonumber(b[2]) + tonumber(b[3]) + tonumber(b[4]) < tonumber(b[1]) then
    return 0
  end
  local now = now_ms()
  redis.call('HSET', KEYS[1], 'status', status, 'ended_ms', now)
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], retention) end
  redis.call('ZADD', finished, now, bid)
  return 1
end
"""

# Record a bulk whose specs and refs are written, and queue it behind the key's
# earlier bulks; refused if the key would have too many items pending.
# The record of the bulk's own log (a job record with only an owner and a
# status, so that ``resume`` finds whose it is) is made here too.
# KEYS[1..5] the bulk's keys, KEYS[6] the key's hold zset, KEYS[7] HOLD,
# KEYS[8] BULK_PENDING, KEYS[9] HOLD_TICKET, KEYS[10] BULK_FINISHED,
# KEYS[11] the job record of the bulk's log
# ARGV[1] bulk id, ARGV[2] key id, ARGV[3] items, ARGV[4] max pending items,
# ARGV[5] TTL s (the wait allowed plus retention), ARGV[6] retention s,
# ARGV[7] '1' to make the log's record, ARGV[8..] further field, value pairs of the record
# Returns {1, ticket} when recorded, {0, items pending} when refused.
SUBMIT = _HELPERS + """
local n = tonumber(ARGV[3])
local pending = tonumber(redis.call('HGET', KEYS[8], ARGV[2]) or '0')
if n > 0 and pending + n > tonumber(ARGV[4]) then return {0, pending} end
local ticket = redis.call('INCR', KEYS[9])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'total', n, 'cursor', 0, 'started', 0,
           'ended', 0, 'done', 0, 'failed', 0, 'cancelled', 0, 'skipped', 0,
           'prompt_tokens', 0, 'completion_tokens', 0, 'status', 'active',
           'created_ms', now_ms(), 'ticket', ticket, unpack(ARGV, 8))
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[11], 'owner', ARGV[2], 'status', 'held')
  redis.call('EXPIRE', KEYS[11], ARGV[5])
end
if n == 0 then
  finish_if_done(KEYS[10], ARGV[1], ARGV[6])
  return {1, ticket}
end
redis.call('HINCRBY', KEYS[8], ARGV[2], n)
redis.call('ZADD', KEYS[6], ticket, ARGV[1])
if redis.call('TTL', KEYS[6]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[6], ARGV[5]) end
redis.call('ZADD', KEYS[7], 'NX', now_ms(), ARGV[2])
return {1, ticket}
"""

# Name a bulk's next held item, passing items cancelled while held; a bulk
# with none left (or no longer active) leaves its key's hold queue.
# KEYS[1..5] the bulk's keys, KEYS[6] the key's hold zset, KEYS[7] HOLD,
# KEYS[8] BULK_KEY_RUNNING
# ARGV[1] bulk id, ARGV[2] key id, ARGV[3] the key's running items at most ('' = no cap)
# Returns {index, spec}; {-1} when the key runs as many items as it may; false
# when the bulk holds no more items.
NEXT = _HELPERS + """
local b = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'total')
if b[1] ~= 'active' then
  unhold(KEYS[6], KEYS[7], ARGV[1], ARGV[2])
  return false
end
if ARGV[3] ~= '' and tonumber(redis.call('HGET', KEYS[8], ARGV[2]) or '0') >= tonumber(ARGV[3])
then
  return {-1}
end
local cursor, total = tonumber(b[2]), tonumber(b[3])
while cursor < total and redis.call('SISMEMBER', KEYS[5], cursor) == 1 do
  cursor = cursor + 1
  redis.call('HINCRBY', KEYS[1], 'skipped', -1)
end
redis.call('HSET', KEYS[1], 'cursor', cursor)
if cursor >= total then
  unhold(KEYS[6], KEYS[7], ARGV[1], ARGV[2])
  return false
end
return {cursor, redis.call('HGET', KEYS[2], cursor)}
"""

# Claim a bulk's next item for starting, if the caps allow: it counts as
# started and running from now on.
# KEYS[1..5] the bulk's keys, KEYS[6] the key's hold zset, KEYS[7] HOLD,
# KEYS[8] BULK_RUNNING, KEYS[9] BULK_KEY_RUNNING, KEYS[10] the key's starts list
# ARGV[1] bulk id, ARGV[2] key id, ARGV[3] index, ARGV[4] job id,
# ARGV[5] items running gateway-wide at most ('' = no cap), ARGV[6] the key's at most
# Returns 1 claimed; 0 the gateway's cap is full; 3 the key's is; 2 the item was
# cancelled meanwhile (passed); -1 another pump claimed it; -2 it is not the
# bulk's next item any more (the bulk was cancelled, or the item started and ended).
CLAIM = _HELPERS + """
if redis.call('ZSCORE', KEYS[8], ARGV[4]) then return -1 end
local b = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'total')
local index, total = tonumber(ARGV[3]), tonumber(b[3])
if b[1] ~= 'active' or tonumber(b[2]) ~= index then return -2 end
local code = 1
if redis.call('SISMEMBER', KEYS[5], index) == 1 then
  redis.call('HINCRBY', KEYS[1], 'skipped', -1)
  code = 2
elseif ARGV[5] ~= '' then
  if redis.call('ZCARD', KEYS[8]) >= tonumber(ARGV[5]) then return 0 end
  if tonumber(redis.call('HGET', KEYS[9], ARGV[2]) or '0') >= tonumber(ARGV[6]) then
    return 3
  end
end
redis.call('HSET', KEYS[1], 'cursor', index + 1)
if code == 1 then
  local now = now_ms()
  redis.call('HINCRBY', KEYS[1], 'started', 1)
  redis.call('ZADD', KEYS[8], now, ARGV[4])
  redis.call('HINCRBY', KEYS[9], ARGV[2], 1)
  redis.call('LPUSH', KEYS[10], now)
  redis.call('LTRIM', KEYS[10], 0, 31)
  redis.call('EXPIRE', KEYS[10], 3600)
end
if index + 1 >= total then unhold(KEYS[6], KEYS[7], ARGV[1], ARGV[2]) end
return code
"""

# Count the end of a started item, once: its outcome, its usage, its result
# (for batches), and the end of its bulk when it was the last.
# KEYS[1..5] the bulk's keys, KEYS[6] BULK_RUNNING, KEYS[7] BULK_KEY_RUNNING,
# KEYS[8] BULK_PENDING, KEYS[9] HOLD, KEYS[10] BULK_FINISHED
# ARGV[1] bulk id, ARGV[2] key id, ARGV[3] job id, ARGV[4] index, ARGV[5] outcome
# (done, failed or cancelled), ARGV[6] result ('' keeps none), ARGV[7] prompt
# tokens, ARGV[8] completion tokens, ARGV[9] retention s.  The result is kept
# only by a bulk that keeps results (a batch).
# Returns 0 if the item was not running (counted before), 1 counted, 2 counted
# and its bulk ended.
END = _HELPERS + """
if redis.call('ZREM', KEYS[6], ARGV[3]) == 0 then return 0 end
decr(KEYS[7], ARGV[2], 1)
decr(KEYS[8], ARGV[2], 1)
-- Its key may start another item now, even if it was waiting for a slot.
redis.call('ZADD', KEYS[9], 'XX', 'LT', now_ms(), ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
redis.call('HINCRBY', KEYS[1], 'ended', 1)
redis.call('HINCRBY', KEYS[1], ARGV[5], 1)
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[8])
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'keep') == '1' then
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], math.max(1, redis.call('TTL', KEYS[1])))
end
return 1 + finish_if_done(KEYS[10], ARGV[1], ARGV[9])
"""

# Stop a bulk: no held item will start; the held ones count as cancelled (or
# expired); the bulk ends now unless some of its items still run.
# KEYS[1..5] the bulk's keys, KEYS[6] the key's hold zset, KEYS[7] HOLD,
# KEYS[8] BULK_PENDING, KEYS[9] BULK_FINISHED
# ARGV[1] bulk id, ARGV[2] key id, ARGV[3] 'cancelling' or 'expiring', ARGV[4] retention s
# Returns {code, first held index, total}: code 0 the bulk is not active (nothing
# done), 1 stopped with items still running, 2 stopped and ended.
STOP = _HELPERS + """
local b = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'total', 'skipped')
if b[1] ~= 'active' then return {0, 0, 0} end
local cursor, total = tonumber(b[2]), tonumber(b[3])
local held = total - cursor - tonumber(b[4])
redis.call('HINCRBY', KEYS[1], 'cancelled', held)
if held > 0 then decr(KEYS[8], ARGV[2], held) end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'cursor', total, 'skipped', 0,
           'stopped_ms', now_ms())
redis.call('DEL', KEYS[2])
unhold(KEYS[6], KEYS[7], ARGV[1], ARGV[2])
return {1 + finish_if_done(KEYS[9], ARGV[1], ARGV[4]), cursor, total}
"""

# Cancel one held item so that it never starts; a bulk that ends so leaves its
# key's hold queue at once.
# KEYS[1..5] the bulk's keys, KEYS[6] BULK_PENDING, KEYS[7] BULK_FINISHED,
# KEYS[8] the key's hold zset, KEYS[9] HOLD
# ARGV[1] bulk id, ARGV[2] key id, ARGV[3] index, ARGV[4] retention s
# Returns 0 the item has started (cancel its job instead), 1 cancelled, 2 cancelled
# and its bulk ended, -1 nothing to cancel (no such item, or it ended or was cancelled).
CANCEL_ITEM = _HELPERS + """
local b = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'total')
local index = tonumber(ARGV[3])
if b[1] ~= 'active' or index >= tonumber(b[3]) then return -1 end
if index < tonumber(b[2]) then return 0 end
if redis.call('SADD', KEYS[5], index) == 0 then return -1 end
redis.call('HINCRBY', KEYS[1], 'skipped', 1)
redis.call('HINCRBY', KEYS[1], 'cancelled', 1)
redis.call('HDEL', KEYS[2], index)
decr(KEYS[6], ARGV[2], 1)
if finish_if_done(KEYS[7], ARGV[1], ARGV[4]) == 0 then return 1 end
unhold(KEYS[8], KEYS[9], ARGV[1], ARGV[2])
return 2
"""


@dataclass(frozen=True)
class Held:
    """One item as submitted: the request, and the client's name for it."""

    spec: JobSpec
    #: Whether the client set ``max_tokens`` (else the tier's default allowance applies).
    max_tokens_given: bool = True
    #: A socket's ``ref`` or a batch line's ``custom_id`` (any JSON value).
    ref: Any = None


@dataclass(frozen=True)
class BulkRecord:
    """A bulk as stored."""

    bulk_id: str
    owner: str
    tier: str
    kind: str
    status: str
    total: int
    cursor: int
    started: int
    ended: int
    done: int
    failed: int
    cancelled: int
    skipped: int
    prompt_tokens: int
    completion_tokens: int
    created_ms: int
    expires_ms: int
    ended_ms: int | None
    stopped_ms: int | None
    ticket: int
    #: Whether the pump writes ``held`` and ``bulk_done`` events to the bulk's log.
    announce: bool
    #: Whether item outcomes are kept (batches: their output files).
    keep: bool

    @property
    def held(self) -> int:
        """Items that have not started and will (unless cancelled)."""
        return self.total - self.cursor - self.skipped if self.status == "active" else 0

    @property
    def running(self) -> int:
        """Items started and not yet ended."""
        return self.started - self.ended

    @property
    def finished(self) -> bool:
        """Whether every item has ended."""
        return self.status not in LIVE


def new_bulk_id() -> str:
    """A fresh bulk id (24 hex digits)."""
    return uuid.uuid4().hex[:BULK_ID_HEX]


def item_job_id(bulk_id: str, index: int) -> str:
    """The job id of a bulk's item ``index``."""
    return f"{bulk_id}{index:08x}"


def log_id(bulk_id: str) -> str:
    """The id of the bulk's own event log, followed like a job's."""
    return item_job_id(bulk_id, LOG_INDEX)


def split_job_id(job_id: str) -> tuple[str, int]:
    """The bulk id and item index of a bulk item's job id."""
    return job_id[:BULK_ID_HEX], int(job_id[BULK_ID_HEX:], 16)


def spec_json(item: Held) -> str:
    """An item's spec as the specs hash keeps it."""
    spec = item.spec
    return json.dumps({"model": spec.model, "messages": spec.messages,
                       "max_tokens": spec.max_tokens, "temperature": spec.temperature,
                       "seed": spec.seed, "given": item.max_tokens_given},
                      separators=(",", ":"), ensure_ascii=False)


def spec_of(raw: str | bytes) -> tuple[JobSpec, bool]:
    """Invert :func:`spec_json`: the spec and whether ``max_tokens`` was given."""
    d = json.loads(raw)
    return (JobSpec(model=d["model"], messages=d["messages"], max_tokens=d["max_tokens"],
                    temperature=d["temperature"], seed=d["seed"]), bool(d["given"]))


class BulkStore:
    """Reads and changes bulks, one Lua call per change.

    Example::

        store = BulkStore(redis.Redis.from_url(url), retention_s=604800)
        store.submit(bid, "k1", items, max_pending=100_000, ttl_s=86400, fields={...})
        index, raw = store.next_item(bid, "k1")
    """

    #: Items written per round trip when a bulk is submitted.
    CHUNK = 500

    def __init__(self, client: redis.Redis, retention_s: int) -> None:
        self.redis = client
        self.retention_s = retention_s
        self._submit = client.register_script(SUBMIT)
        self._next = client.register_script(NEXT)
        self._claim = client.register_script(CLAIM)
        self._end = client.register_script(END)
        self._stop = client.register_script(STOP)
        self._cancel_item = client.register_script(CANCEL_ITEM)

    @staticmethod
    def bulk_keys(bulk_id: str) -> list[str]:
        """The five keys of a bulk, in the order every script takes them."""
        return [keys.bulk(bulk_id), keys.bulk_specs(bulk_id), keys.bulk_refs(bulk_id),
                keys.bulk_results(bulk_id), keys.bulk_skip(bulk_id)]

    def submit(self, bulk_id: str, owner: str, items: list[Held], *, max_pending: int,
               ttl_s: int, fields: dict[str, str | int], log_key: str | None = None
               ) -> int | None:
        """Store a bulk's items and queue it behind its key's earlier bulks.

        :param ttl_s: how long the bulk may live unfinished (its wait plus retention).
        :param fields: further fields of the record (tier, kind, wait_ms, announce, keep).
        :param log_key: the job record of the bulk's own log, to be made with its owner.
        :return: the bulk's ticket, or ``None`` when the key would have more than
            ``max_pending`` items pending (nothing is kept then).
        """
        bkeys = self.bulk_keys(bulk_id)
        for start in range(0, len(items), self.CHUNK):
            gevent.sleep(0)  # a front end's other sockets go on while a big batch is written
            pipe = self.redis.pipeline(transaction=False)
            chunk = items[start:start + self.CHUNK]
            specs: dict[Any, Any] = {str(start + i): spec_json(it)
                                     for i, it in enumerate(chunk)}
            pipe.hset(bkeys[1], mapping=specs)
            refs: dict[Any, Any] = {str(start + i): json.dumps(it.ref)
                                    for i, it in enumerate(chunk) if it.ref is not None}
            if refs:
                pipe.hset(bkeys[2], mapping=refs)
            pipe.expire(bkeys[1], ttl_s)
            pipe.expire(bkeys[2], ttl_s)
            pipe.execute()
        flat = [x for kv in fields.items() for x in kv]
        ok, value = self._submit(
            keys=[*bkeys, keys.hold(owner), keys.HOLD, keys.BULK_PENDING, keys.HOLD_TICKET,
                  keys.BULK_FINISHED, log_key or bkeys[0]],
            args=[bulk_id, owner, len(items), max_pending, ttl_s, self.retention_s,
                  "1" if log_key else "0", *flat])
        if not ok:
            self.redis.delete(bkeys[1], bkeys[2])
            return None
        return int(value)

    def get(self, bulk_id: str) -> BulkRecord | None:
        """A bulk's record, or ``None`` when there is none (or it expired)."""
        return _record(bulk_id, self.redis.hgetall(keys.bulk(bulk_id)))

    def get_many(self, bulk_ids: list[str]) -> list[BulkRecord | None]:
        """Several bulks' records in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for bid in bulk_ids:
            pipe.hgetall(keys.bulk(bid))
        return [_record(bid, raw) for bid, raw in zip(bulk_ids, pipe.execute(), strict=True)]

    def owner_of(self, bulk_id: str) -> str | None:
        """The key id that submitted a bulk."""
        value = self.redis.hget(keys.bulk(bulk_id), "owner")
        return value.decode() if isinstance(value, bytes) else value

    def ready_keys(self, now_ms: int) -> list[str]:
        """Keys with held items that the pump may try now, longest waiting first."""
        return _texts(self.redis.zrange(keys.HOLD, "-inf", now_ms, byscore=True))

    def next_ready_ms(self) -> int | None:
        """When the first key that is not ready now becomes ready (ms), if any."""
        first: Any = self.redis.zrange(keys.HOLD, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    def forget_key(self, key_id: str) -> None:
        """Take a key that holds no bulks off the pump's list."""
        self.redis.zrem(keys.HOLD, key_id)

    def defer(self, key_id: str, until_ms: int) -> None:
        """Let the pump try ``key_id`` again only from ``until_ms`` (if it still holds items)."""
        self.redis.zadd(keys.HOLD, {key_id: until_ms}, xx=True)

    def held_bulks(self, key_id: str, limit: int = 0) -> list[str]:
        """A key's bulks that hold items, in submission order (the first ``limit`` if given)."""
        return _texts(self.redis.zrange(keys.hold(key_id), 0, limit - 1))

    def all_held_keys(self) -> list[str]:
        """Every key with held items."""
        return _texts(self.redis.zrange(keys.HOLD, 0, -1))

    def next_item(self, bulk_id: str, owner: str, key_cap: int | None = None
                  ) -> tuple[int, bytes | None] | None:
        """The bulk's next held item: its index and spec; ``None`` when it holds no more.

        :param key_cap: with it, the index is -1 when the key already runs that many items.
        """
        out = self._next(keys=[*self.bulk_keys(bulk_id), keys.hold(owner), keys.HOLD,
                               keys.BULK_KEY_RUNNING],
                         args=[bulk_id, owner, "" if key_cap is None else key_cap])
        if not out:
            return None
        return (int(out[0]), out[1] if len(out) > 1 else None)

    def claim(self, bulk_id: str, owner: str, index: int, *, cap: int | None,
              key_cap: int = 0) -> int:
        """Claim item ``index`` for starting (see :data:`CLAIM` for the codes).

        :param cap: items running gateway-wide at most; ``None`` claims regardless
            (an item that fails at once).
        """
        return int(self._claim(
            keys=[*self.bulk_keys(bulk_id), keys.hold(owner), keys.HOLD, keys.BULK_RUNNING,
                  keys.BULK_KEY_RUNNING, keys.bulk_starts(owner)],
            args=[bulk_id, owner, index, item_job_id(bulk_id, index),
                  "" if cap is None else cap, key_cap]))

    def drop_spec(self, bulk_id: str, index: int) -> str | None:
        """Forget a started item's spec (its job record has it now); return the bulk's status."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(keys.bulk_specs(bulk_id), str(index))
        pipe.hget(keys.bulk(bulk_id), "status")
        status = pipe.execute()[1]
        return None if status is None else _text(status)

    def status(self, bulk_id: str) -> str | None:
        """A bulk's status, or ``None`` when there is no such bulk."""
        value = self.redis.hget(keys.bulk(bulk_id), "status")
        return value.decode() if isinstance(value, bytes) else value

    def spec(self, bulk_id: str, index: int) -> bytes | None:
        """An item's spec, while it has not started."""
        value: Any = self.redis.hget(keys.bulk_specs(bulk_id), str(index))
        return value if isinstance(value, bytes) or value is None else value.encode()

    def end(self, job_id: str, owner: str, outcome: str, result: str, prompt_tokens: int,
            completion_tokens: int) -> int:
        """Count a started item's end once (see :data:`END` for the codes)."""
        bulk_id, index = split_job_id(job_id)
        return int(self._end(
            keys=[*self.bulk_keys(bulk_id), keys.BULK_RUNNING, keys.BULK_KEY_RUNNING,
                  keys.BULK_PENDING, keys.HOLD, keys.BULK_FINISHED],
            args=[bulk_id, owner, job_id, index, outcome, result, prompt_tokens,
                  completion_tokens, self.retention_s]))

    def stop(self, bulk_id: str, owner: str, status: str) -> tuple[int, int, int]:
        """Stop a bulk (``cancelling`` or ``expiring``; see :data:`STOP` for the reply)."""
        code, first, total = self._stop(
            keys=[*self.bulk_keys(bulk_id), keys.hold(owner), keys.HOLD, keys.BULK_PENDING,
                  keys.BULK_FINISHED],
            args=[bulk_id, owner, status, self.retention_s])
        return int(code), int(first), int(total)

    def cancel_item(self, bulk_id: str, owner: str, index: int) -> int:
        """Cancel a held item (see :data:`CANCEL_ITEM` for the codes)."""
        return int(self._cancel_item(
            keys=[*self.bulk_keys(bulk_id), keys.BULK_PENDING, keys.BULK_FINISHED,
                  keys.hold(owner), keys.HOLD],
            args=[bulk_id, owner, index, self.retention_s]))

    def skipped(self, bulk_id: str) -> set[int]:
        """Indexes of items cancelled while held."""
        return {int(i) for i in self.redis.smembers(keys.bulk_skip(bulk_id))}

    def running(self) -> dict[str, int]:
        """Every started item not yet ended: job id -> when it was claimed (ms)."""
        pairs: Any = self.redis.zrange(keys.BULK_RUNNING, 0, -1, withscores=True)
        return {_text(j): int(ms) for j, ms in pairs}

    def running_count(self) -> int:
        """How many started items have not ended, gateway-wide."""
        return int(self.redis.zcard(keys.BULK_RUNNING))

    def running_of(self, bulk_id: str) -> list[str]:
        """The job ids of a bulk's items that run now."""
        return [j for j in self.running() if j.startswith(bulk_id)]

    def key_running(self, key_id: str) -> int:
        """A key's started items not yet ended."""
        return int(self.redis.hget(keys.BULK_KEY_RUNNING, key_id) or 0)

    def finished(self) -> list[str]:
        """Bulks that ended and whose end was not yet announced."""
        return _texts(self.redis.zrange(keys.BULK_FINISHED, 0, -1))

    def forget_finished(self, bulk_id: str) -> None:
        """The end of ``bulk_id`` was announced."""
        self.redis.zrem(keys.BULK_FINISHED, bulk_id)

    def starts(self, key_id: str) -> list[int]:
        """When the key's latest items started (ms), newest first."""
        return [int(ms) for ms in self.redis.lrange(keys.bulk_starts(key_id), 0, -1)]

    def not_before_ms(self, key_id: str) -> int | None:
        """When the pump may next try the key (ms), if it holds items."""
        score = self.redis.zscore(keys.HOLD, key_id)
        return None if score is None else int(score)

    def refs(self, bulk_id: str, indexes: list[int]) -> list[Any]:
        """The refs of some items (``None`` where none was given)."""
        if not indexes:
            return []
        raw = self.redis.hmget(keys.bulk_refs(bulk_id), [str(i) for i in indexes])
        return [None if r is None else json.loads(r) for r in raw]

    def results(self, bulk_id: str, indexes: list[int]) -> list[bytes | None]:
        """The kept outcomes of some items (``None`` where there is none)."""
        if not indexes:
            return []
        out: Any = self.redis.hmget(keys.bulk_results(bulk_id), [str(i) for i in indexes])
        return list(out)

    def drop_results(self, bulk_id: str) -> None:
        """Forget a bulk's kept outcomes (they were rendered into files)."""
        self.redis.delete(keys.bulk_results(bulk_id))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> list[str]:
    return [_text(v) for v in values]


def _record(bulk_id: str, raw: dict[Any, Any]) -> BulkRecord | None:
    d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in raw.items()}
    if "owner" not in d:
        return None

    def num(name: str) -> int:
        return int(d.get(name) or 0)

    def opt(name: str) -> int | None:
        return int(d[name]) if d.get(name) else None

    return BulkRecord(
        bulk_id=bulk_id, owner=d["owner"], tier=d.get("tier", ""), kind=d.get("kind", "bulk"),
        status=d["status"], total=num("total"), cursor=num("cursor"), started=num("started"),
        ended=num("ended"), done=num("done"), failed=num("failed"), cancelled=num("cancelled"),
        skipped=num("skipped"), prompt_tokens=num("prompt_tokens"),
        completion_tokens=num("completion_tokens"), created_ms=num("created_ms"),
        expires_ms=num("created_ms") + num("wait_ms"), ended_ms=opt("ended_ms"),
        stopped_ms=opt("stopped_ms"),
        ticket=num("ticket"), announce=d.get("announce") == "1", keep=d.get("keep") == "1")
