"""The broker transport of Sluice's Celery app: kombu's Redis transport, one client per channel.

kombu's Redis channel builds a new ``redis.Redis`` for every publish, every
ack and every QoS step (``Channel.conn_or_acquire`` calls ``_create_client``),
and each one copies redis-py's ~300 response callbacks: about 6 % of a
worker's CPU per job.  A ``redis.Redis`` is only a facade over the channel's
connection pool, safe to share between greenlets, so one per pool serves them
all.  kombu has no setting for this (nor an open issue about it).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that builds its synchronous client once per connection pool."""

    _shared: tuple[redis.ConnectionPool, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's own client (BRPOP), built once by kombu already
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        # A new pool (after the channel reconnects) gets a new client.
        if self._shared is None or self._shared[0] is not pool:
            self._shared = (pool, super()._create_client())  # type: ignore[no-untyped-call]
        return self._shared[1]


def share_redis_clients() -> None:
    """Make kombu's Redis transport use :class:`Channel` in this process (idempotent).

    Set on kombu's ``Transport.Channel`` rather than passed as Celery's
    ``broker_transport``: the broker URL then keeps its ``redis://`` scheme,
    which Flower and the worker's banner read, and ``rediss://`` keeps kombu's
    TLS defaults.  Other brokers (AMQP, Sentinel) are left alone.
    """
    kombu_redis.Transport.Channel = Channel
