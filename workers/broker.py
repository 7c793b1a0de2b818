"""The broker side of Sluice's Celery app: one Redis client per channel, a control loop that lasts.

kombu's Redis channel builds a new ``redis.Redis`` for every publish, every
ack and every QoS step (``Channel.conn_or_acquire`` calls ``_create_client``),
and each one copies redis-py's ~300 response callbacks: about 6 % of a
worker's CPU per job.  A ``redis.Redis`` is only a facade over the channel's
connection pool, safe to share between greenlets, so one per pool serves them
all.  kombu has no setting for this (nor an open issue about it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery.worker.pidbox import gPidbox
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


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


def keep_control_alive() -> None:
    """Restart a gevent worker's control loop when its connection drops (idempotent).

    Celery's greenlet pidbox loop (``gPidbox.loop``) ends at the first
    connection error: the worker then never again answers ``celery inspect``,
    Flower or ``enable_events``, for instance after Redis drops its pub/sub
    connections (``CLIENT KILL TYPE pubsub``, an output buffer limit).
    """
    if getattr(gPidbox.loop, "restarts", False):
        return
    once = gPidbox.loop

    def loop(self: gPidbox, c: Any) -> None:
        while True:
            try:
                once(self, c)
                return  # shut down
            except Exception:  # any connection error; the loop itself never raises others
                log.warning("control channel lost; reconnecting", exc_info=True)
            shutdown = self._node_shutdown
            if shutdown is None or shutdown.is_set() or not c.connection:
                return
            time.sleep(1.0)

    loop.restarts = True  # type: ignore[attr-defined]
    gPidbox.loop = loop
