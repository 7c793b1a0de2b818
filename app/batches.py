"""Batches: a bulk with the Batch API's own fields, rendered as OpenAI's ``batch`` object.

The bulk (:mod:`tasks.bulk`) holds the items, their counts and status; the
batch record adds what OpenAI's object has besides (endpoint, input file,
metadata, the input's bad lines) and is kept as long as the bulk.  A batch
whose input fails validation as a whole has a record and no bulk.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from app.batch_input import LineError
from app.files import result_file_id
from tasks import keys
from tasks.bulk import BulkStatus

BATCH_ID = re.compile(r"^batch_(?P<bulk>[0-9a-f]{24})$")
#: A bulk's status -> the batch's.
STATUS = {"active": "in_progress", "expiring": "in_progress", "cancelling": "cancelling",
          "completed": "completed", "cancelled": "cancelled", "expired": "expired"}
WINDOWS_S = {"24h": 86400}


def batch_id(bulk_id: str) -> str:
    """The batch id of a bulk."""
    return f"batch_{bulk_id}"


@dataclass
class BatchRecord:
    """What a batch keeps besides its bulk."""

    bulk_id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    metadata: dict[str, str] | None = None
    #: The input's bad lines (or, for a failed batch, why the file was refused).
    errors: list[LineError] = field(default_factory=list)
    failed_at: int | None = None
    #: Whether its output and error files were rendered.
    rendered: bool = False

    @property
    def expires_at(self) -> int:
        """When held requests expire."""
        return self.created_at + WINDOWS_S.get(self.completion_window, 86400)


class BatchStore:
    """Keeps batch records and each key's list of them.

    Example::

        batches = BatchStore(client, ttl_s=86400 + 604800)
        batches.put(record)
        page, more = batches.list("k1", after=None, limit=20)
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def put(self, rec: BatchRecord) -> None:
        """Store a new batch and list it under its key."""
        pipe = self.redis.pipeline()
        pipe.hset(keys.batch(rec.bulk_id), mapping=_fields(rec))
        pipe.expire(keys.batch(rec.bulk_id), self.ttl_s)
        pipe.zadd(keys.batches(rec.owner), {rec.bulk_id: time.time()})
        pipe.expire(keys.batches(rec.owner), self.ttl_s)
        pipe.execute()

    def set_errors(self, bulk_id: str, errors: list[LineError]) -> None:
        """Replace the batch's line errors."""
        self.redis.hset(keys.batch(bulk_id), "errors", json.dumps([e.__dict__ for e in errors]))

    def forget(self, owner: str, bulk_id: str) -> None:
        """Drop a batch (and its place in its key's list)."""
        self.redis.delete(keys.batch(bulk_id))
        self.redis.zrem(keys.batches(owner), bulk_id)

    def claim_render(self, bulk_id: str, ttl_s: int = 120) -> bool:
        """Whether this process may render the batch's files (one process at a time)."""
        return bool(self.redis.set(keys.batch_render(bulk_id), 1, nx=True, ex=ttl_s))

    def mark_rendered(self, bulk_id: str, ttl_s: int) -> None:
        """Its files were rendered; keep the record as long as them."""
        pipe = self.redis.pipeline()
        pipe.hset(keys.batch(bulk_id), "rendered", 1)
        pipe.expire(keys.batch(bulk_id), ttl_s)
        pipe.delete(keys.batch_render(bulk_id))
        pipe.execute()

    def get(self, bulk_id: str, owner: str) -> BatchRecord | None:
        """The owner's batch, or ``None`` (none, expired, or another key's)."""
        raw: Any = self.redis.hgetall(keys.batch(bulk_id))
        d = {k.decode(): v.decode() for k, v in raw.items()}
        if d.get("owner") != owner:
            return None
        return BatchRecord(
            bulk_id, owner, d["endpoint"], d["input_file_id"], d["completion_window"],
            int(d["created_at"]), json.loads(d.get("metadata", "null")),
            [LineError(**e) for e in json.loads(d.get("errors", "[]"))],
            int(d["failed_at"]) if d.get("failed_at") else None, d.get("rendered") == "1")

    def list(self, owner: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """The owner's batch (bulk) ids, newest first, after ``after``; and whether more follow."""
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(keys.batches(owner), after)
            if rank is None:
                return [], False
            start = int(rank) + 1  # type: ignore[arg-type]
        ids: Any = self.redis.zrevrange(keys.batches(owner), start, start + limit)
        found = [i.decode() for i in ids]
        return found[:limit], len(found) > limit


def _fields(rec: BatchRecord) -> dict[Any, Any]:
    out: dict[Any, Any] = {
        "owner": rec.owner, "endpoint": rec.endpoint, "input_file_id": rec.input_file_id,
        "completion_window": rec.completion_window, "created_at": rec.created_at,
        "metadata": json.dumps(rec.metadata),
        "errors": json.dumps([e.__dict__ for e in rec.errors])}
    if rec.failed_at is not None:
        out["failed_at"] = rec.failed_at
    return out


def batch_object(rec: BatchRecord, status: BulkStatus | None) -> dict[str, Any]:
    """OpenAI's ``batch`` object, with Sluice's figures on held items under ``sluice``."""
    obj: dict[str, Any] = {
        "id": batch_id(rec.bulk_id), "object": "batch", "endpoint": rec.endpoint,
        "model": None, "errors": None, "input_file_id": rec.input_file_id,
        "completion_window": rec.completion_window, "status": "failed",
        "output_file_id": None, "error_file_id": None, "created_at": rec.created_at,
        "in_progress_at": None, "expires_at": rec.expires_at, "finalizing_at": None,
        "completed_at": None, "failed_at": rec.failed_at, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": len(rec.errors), "completed": 0,
                           "failed": len(rec.errors)},
        "usage": None, "metadata": rec.metadata}
    if rec.errors:
        obj["errors"] = {"object": "list", "data": [e.as_dict() for e in rec.errors]}
    if status is None:
        return obj
    bulk = status.record
    invalid = len(rec.errors)
    ended_s = bulk.ended_ms // 1000 if bulk.ended_ms else None
    obj.update({
        "status": STATUS[bulk.status], "in_progress_at": rec.created_at,
        "request_counts": {"total": bulk.total + invalid, "completed": bulk.done,
                           "failed": bulk.failed + invalid},
        "usage": {"input_tokens": bulk.prompt_tokens, "output_tokens": bulk.completion_tokens,
                  "total_tokens": bulk.prompt_tokens + bulk.completion_tokens,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
        "sluice": {"held": bulk.held, "running": bulk.running, "cancelled": bulk.cancelled,
                   "position": status.position, "next_eta_s": status.next_eta_s,
                   "last_eta_s": status.last_eta_s}})
    if bulk.stopped_ms and bulk.status in ("cancelling", "cancelled"):
        obj["cancelling_at"] = bulk.stopped_ms // 1000
    if bulk.finished:
        obj[{"completed": "completed_at", "cancelled": "cancelled_at",
             "expired": "expired_at"}[bulk.status]] = ended_s
        obj["finalizing_at"] = ended_s
        if bulk.done:
            obj["output_file_id"] = result_file_id(rec.bulk_id, "output")
        if bulk.failed or bulk.cancelled or invalid:
            obj["error_file_id"] = result_file_id(rec.bulk_id, "errors")
    return obj
