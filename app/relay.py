"""One Redis pub/sub connection per front-end process, fanning job events out to sockets.

Followers never trust pub/sub alone.  A wake-up carries the event, but when a
follower sees a seq beyond the one it expects (it subscribed late, the
connection dropped, or it shed load) it reads the missing events from the
job's log; once a subscription is confirmed each follower reads the log from
its position.  So resuming, a worker faster than the front end, and a
reconnect are all the same code path, and nothing is lost.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from typing import Protocol

import gevent
import redis

from tasks import keys

log = logging.getLogger(__name__)


class Follower(Protocol):
    """What the relay hands events to (a socket's connection)."""

    def on_event(self, job_id: str, seq: int, frame: str) -> None:
        """A live event arrived; must not block."""

    def on_catchup(self, job_id: str) -> None:
        """Read the log from your position now; must not block."""


class Relay:
    """Subscribes to the wake-up channels of the jobs this process's sockets follow.

    Example::

        relay = Relay(redis.Redis.from_url(url))
        relay.follow(job_id, connection)   # connection.on_catchup(job_id) follows
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.followers: dict[str, set[Follower]] = defaultdict(set)
        # Subscribe commands sent whose confirmation has not come back yet.
        self.unconfirmed: dict[str, int] = defaultdict(int)
        self.pubsub: redis.client.PubSub | None = None
        self.reader: gevent.Greenlet | None = None

    def follow(self, job_id: str, follower: Follower) -> None:
        """Start delivering ``job_id``'s events to ``follower``.

        The follower gets :meth:`Follower.on_catchup` once the subscription is
        live, then every event as it is published.
        """
        self._ensure_reader()
        channel = keys.wake(job_id)
        first = not self.followers[job_id]
        self.followers[job_id].add(follower)
        if first:
            self.unconfirmed[job_id] += 1
            assert self.pubsub is not None
            try:
                self.pubsub.subscribe(channel)
            except redis.RedisError:
                self.unconfirmed[job_id] -= 1
                self.followers[job_id].discard(follower)
                if not self.followers[job_id]:
                    del self.followers[job_id]
                raise
        elif not self.unconfirmed.get(job_id):
            follower.on_catchup(job_id)

    def unfollow(self, job_id: str, follower: Follower) -> None:
        """Stop delivering ``job_id``'s events to ``follower``."""
        followers = self.followers.get(job_id)
        if not followers or follower not in followers:
            return
        followers.discard(follower)
        if not followers:
            del self.followers[job_id]
            if self.pubsub is not None:
                try:
                    self.pubsub.unsubscribe(keys.wake(job_id))
                except redis.RedisError as e:
                    # Harmless: wake-ups for a job nobody follows are dropped.
                    log.warning("could not unsubscribe from job %s: %s", job_id, e)

    def _ensure_reader(self) -> None:
        if self.reader is None or self.reader.dead:
            self.pubsub = self.redis.pubsub()
            # A channel of our own keeps the connection subscribed, so listen()
            # never returns for want of subscriptions.
            self.pubsub.subscribe(f"{keys.PREFIX}relay:{uuid.uuid4().hex}")
            self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        assert self.pubsub is not None
        while True:
            try:
                for message in self.pubsub.listen():
                    self._dispatch(message)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                # redis-py resubscribes on reconnect; everything published
                # meanwhile is read from the logs once confirmations return.
                log.warning("relay lost its Redis connection (%s); reconnecting", e)
                for job_id in self.followers:
                    self.unconfirmed[job_id] = 1
                gevent.sleep(0.5)

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        channel = message["channel"]
        assert isinstance(channel, bytes)
        if not channel.startswith(keys.WAKE_PREFIX.encode()):
            return
        job_id = keys.job_id_of_wake(channel.decode())
        if kind == "message":
            data = message["data"]
            assert isinstance(data, bytes)
            seq, _, frame = data.partition(b" ")
            text = frame.decode()
            for follower in tuple(self.followers.get(job_id, ())):
                follower.on_event(job_id, int(seq), text)
        elif kind == "subscribe":
            left = self.unconfirmed.get(job_id, 0) - 1
            if left > 0:
                self.unconfirmed[job_id] = left
                return
            self.unconfirmed.pop(job_id, None)
            for follower in tuple(self.followers.get(job_id, ())):
                follower.on_catchup(job_id)
