"""Batch API files in Redis: uploaded inputs, and the output and error files of batches.

A file is a small record hash and its bytes, both expiring after
``batch_retention_s``.  Redis (with AOF persistence) keeps them through any
restart of Sluice's processes; a file store on disk would hold more for
less memory but would need a volume shared by every front end.

Uploaded files have ids ``file-<24 hex>``; a batch's output and error files
are ``file-<batch's 24 hex>-output`` and ``-errors``, rendered from its kept
results the first time they are asked for once the batch has ended.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from tasks import keys

UPLOAD_ID = re.compile(r"^file-[0-9a-f]{24}$")
RESULT_ID = re.compile(r"^file-(?P<bulk>[0-9a-f]{24})-(?P<which>output|errors)$")


@dataclass(frozen=True)
class FileRecord:
    """A file, as OpenAI's ``file`` object describes it."""

    file_id: str
    owner: str
    purpose: str
    filename: str
    size: int
    created_at: int
    expires_at: int

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.file_id, "object": "file", "bytes": self.size,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


def result_file_id(bulk_id: str, which: str) -> str:
    """The id of a batch's ``output`` or ``errors`` file."""
    return f"file-{bulk_id}-{which}"


class FileStore:
    """Keeps files for ``ttl_s``; each belongs to the key that made it.

    Example::

        files = FileStore(client, ttl_s=604800)
        rec = files.create("k1", "batch", "in.jsonl", b'{"custom_id": …}\\n')
        files.content(rec.file_id)
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def create(self, owner: str, purpose: str, filename: str, content: bytes,
               file_id: str | None = None) -> FileRecord:
        """Store a file under a new id (or ``file_id``)."""
        now = int(time.time())
        rec = FileRecord(file_id or f"file-{uuid.uuid4().hex[:24]}", owner, purpose,
                         filename, len(content), now, now + self.ttl_s)
        pipe = self.redis.pipeline()
        pipe.set(keys.file_content(rec.file_id), content, ex=self.ttl_s)
        pipe.hset(keys.file(rec.file_id), mapping={
            "owner": owner, "purpose": purpose, "filename": filename, "bytes": rec.size,
            "created_at": now, "expires_at": rec.expires_at})
        pipe.expire(keys.file(rec.file_id), self.ttl_s)
        pipe.execute()
        return rec

    def get(self, file_id: str, owner: str) -> FileRecord | None:
        """The owner's file, or ``None`` (none, expired, or another key's)."""
        record: Any = self.redis.hgetall(keys.file(file_id))
        raw = {k.decode(): v.decode() for k, v in record.items()}
        if raw.get("owner") != owner:
            return None
        return FileRecord(file_id, owner, raw["purpose"], raw["filename"], int(raw["bytes"]),
                          int(raw["created_at"]), int(raw["expires_at"]))

    def content(self, file_id: str) -> bytes | None:
        """A file's bytes."""
        value: Any = self.redis.get(keys.file_content(file_id))
        return value if isinstance(value, bytes) or value is None else value.encode()

    def delete(self, file_id: str) -> None:
        """Forget a file."""
        self.redis.delete(keys.file(file_id), keys.file_content(file_id))
