"""What a run left behind in Redis: admission state that should be gone, keys that never expire."""

from __future__ import annotations

from fnmatch import fnmatchcase

import redis

from tasks import keys

#: Keys that live until an operator deletes them (see tasks/keys.py): API key
#: records and their index.  Every other ``sluice:`` key must have a TTL.
PERMANENT = (keys.API_KEYS, keys.api_key("*"))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def held(client: redis.Redis, key_id: str) -> dict[str, list[str]]:
    """Per-job state still held: the key's concurrency slots, token reservations, running jobs.

    All three must be empty once every job has ended and settled.
    """
    return {
        "slots": sorted(_text(j) for j in client.zrange(keys.slots(key_id), 0, -1)),
        "reservations": sorted(_text(k) for k in client.scan_iter(
            match=keys.reservation("*"), count=1000)),
        "running": sorted(_text(j) for j in client.zrange(keys.RUNNING, 0, -1)),
    }


def keys_without_ttl(client: redis.Redis) -> list[str]:
    """``sluice:`` keys that never expire, other than the permanent ones."""
    found = []
    for raw in client.scan_iter(match=keys.PREFIX + "*", count=1000):
        name = _text(raw)
        if any(fnmatchcase(name, pattern) for pattern in PERMANENT):
            continue
        if client.ttl(name) == -1:
            found.append(name)
    return sorted(found)
