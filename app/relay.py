"""One Redis pub/sub connection per front-end process, fanning job events out to sockets.

Followers never trust pub/sub alone.  A wake-up carries the event, but when a
follower sees a seq beyond the one it expects (it subscribed late, the
connection dropped, or it shed load) it reads the missing events from the
job's log; once a subscription is confirmed each follower reads the log from
its position.  So resuming, a worker faster than the front end, and a
reconnect are all the same code path, and nothing is lost.

One greenlet owns the pub/sub connection: it reads, and it sends the
(un)subscribe commands that sockets queue.  Two greenlets on one connection
is what gevent forbids and what a reconnect would tear.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict, deque
from typing import Protocol

import gevent
import redis

from tasks import keys

log = logging.getLogger(__name__)

#: How long the reader waits for a message before sending queued commands.
POLL_S = 0.02
#: Channels per SUBSCRIBE when resubscribing after a reconnect.
BATCH = 1000


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
        # Subscribe commands queued or sent whose confirmation has not come back.
        self.unconfirmed: dict[str, int] = defaultdict(int)
        self.commands: deque[tuple[str, str]] = deque()
        self.reader: gevent.Greenlet | None = None

    def follow(self, job_id: str, follower: Follower) -> None:
        """Start delivering ``job_id``'s events to ``follower``; never blocks.

        The follower gets :meth:`Follower.on_catchup` once the subscription is
        live, then every event as it is published.
        """
        if self.reader is None or self.reader.dead:
            self.reader = gevent.spawn(self._run)
        first = not self.followers[job_id]
        self.followers[job_id].add(follower)
        if first:
            self.unconfirmed[job_id] += 1
            self.commands.append(("subscribe", keys.wake(job_id)))
        elif not self.unconfirmed.get(job_id):
            follower.on_catchup(job_id)

    def unfollow(self, job_id: str, follower: Follower) -> None:
        """Stop delivering ``job_id``'s events to ``follower``; never blocks or raises."""
        followers = self.followers.get(job_id)
        if not followers or follower not in followers:
            return
        followers.discard(follower)
        if not followers:
            del self.followers[job_id]
            self.commands.append(("unsubscribe", keys.wake(job_id)))

    def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                # A channel of our own keeps the connection subscribed, so
                # get_message() always has a connection to wait on.
                pubsub.subscribe(keys.relay_channel(uuid.uuid4().hex))
                self._resubscribe(pubsub)
                while True:
                    self._send_commands(pubsub)
                    message = pubsub.get_message(timeout=POLL_S)
                    while message is not None:
                        self._dispatch(message)
                        message = pubsub.get_message(timeout=0)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                log.warning("relay lost its Redis connection (%s); reconnecting", e)
                gevent.sleep(0.5)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    def _resubscribe(self, pubsub: redis.client.PubSub) -> None:
        # A new connection: everything followed is subscribed afresh, and each
        # follower catches up from the log once its confirmation is back.
        self.commands.clear()
        self.unconfirmed.clear()
        channels = []
        for job_id in self.followers:
            self.unconfirmed[job_id] = 1
            channels.append(keys.wake(job_id))
        for i in range(0, len(channels), BATCH):
            pubsub.subscribe(*channels[i:i + BATCH])

    def _send_commands(self, pubsub: redis.client.PubSub) -> None:
        while self.commands:
            kind = self.commands[0][0]
            batch: list[str] = []
            while self.commands and self.commands[0][0] == kind and len(batch) < BATCH:
                batch.append(self.commands.popleft()[1])
            if kind == "subscribe":
                pubsub.subscribe(*batch)
            else:
                pubsub.unsubscribe(*batch)

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
            # Also a resubscription redis-py made on its own after a dropped
            # connection: then every follower catches up on what it missed.
            left = self.unconfirmed.get(job_id, 0) - 1
            if left > 0:
                self.unconfirmed[job_id] = left
                return
            self.unconfirmed.pop(job_id, None)
            for follower in tuple(self.followers.get(job_id, ())):
                follower.on_catchup(job_id)
