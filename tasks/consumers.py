"""Which Celery queues have a consumer: worker processes announce theirs with a heartbeat.

Design, simplest first: one sorted set, queue -> the Redis-time deadline of its
last announcement; each worker process re-announces every
``queue_heartbeat_s`` with a deadline three periods ahead, so a queue whose
last worker stopped drops out by itself.  The front end's ``/readyz`` compares
it with the model -> queue map of the providers config.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from tasks import keys

# Announce queues: each gets a deadline; entries past theirs go.
# KEYS[1] the queues zset; ARGV[1] TTL ms, ARGV[2..] queue names.  Returns nothing.
ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  local old = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if not old or old < now + ttl then redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
"""

# The queues whose deadline has not passed.
# KEYS[1] the queues zset.  Returns their names.
LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""


class QueueConsumers:
    """The register of queues that some worker process consumes.

    Example::

        consumers = QueueConsumers(redis_client)
        consumers.announce(["sluice", "gpu-a"], ttl_s=30)
        "gpu-a" in consumers.live()
    """

    def __init__(self, client: redis.Redis) -> None:
        self._announce = client.register_script(ANNOUNCE)
        self._live = client.register_script(LIVE)

    def announce(self, queues: Iterable[str], ttl_s: float) -> None:
        """Say that this process consumes ``queues`` for the next ``ttl_s`` seconds."""
        self._announce(keys=[keys.QUEUES], args=[int(ttl_s * 1000), *queues])

    def live(self) -> set[str]:
        """The queues some worker process consumes now."""
        return {q.decode() for q in self._live(keys=[keys.QUEUES])}


def unserved(queues: dict[str, str], live: set[str]) -> dict[str, list[str]]:
    """Queues of the model -> queue map that no worker consumes, with their models."""
    out: dict[str, list[str]] = {}
    for model, queue in sorted(queues.items()):
        if queue not in live:
            out.setdefault(queue, []).append(model)
    return out
