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

The same connection carries what concerns the whole process, for its
:class:`Watcher` (the socket registry): revoked API keys, a (re)subscription
to them (whatever was revoked while we were not listening must be checked
now), and the loss of Redis.  A pub/sub connection sends nothing while idle,
so a dead one would never raise: the reader PINGs every :data:`PING_S` and
counts the connection dead when nothing, not even the PONG, came back for
:data:`DEAD_AFTER_S`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict, deque
from typing import Protocol

import gevent
import gevent.select
import redis

from tasks import keys

log = logging.getLogger(__name__)

#: Channels per SUBSCRIBE when resubscribing after a reconnect.
BATCH = 1000
#: How often an idle pub/sub connection is asked to prove it is alive.
PING_S = 1.0
#: Silence after which the connection is counted dead (no PONG to three PINGs).
DEAD_AFTER_S = 3.0
#: Pause between attempts to reconnect.
RETRY_S = 0.25


class Follower(Protocol):
    """What the relay hands events to (a socket's connection)."""

    def on_event(self, job_id: str, seq: int, frame: str) -> None:
        """A live event arrived; must not block."""

    def on_catchup(self, job_id: str) -> None:
        """Read the log from your position now; must not block."""


class Watcher:
    """What the relay tells about the whole process; every method must not block."""

    def on_revoked(self, key_id: str) -> None:
        """An API key was revoked."""

    def on_watching(self) -> None:
        """Revocations are being heard (again): check for any missed meanwhile."""

    def on_redis_lost(self) -> None:
        """Redis is gone (unreachable for a while, or restarted and maybe emptied)."""


class Relay:
    """Subscribes to the wake-up channels of the jobs this process's sockets follow.

    Example::

        relay = Relay(redis.Redis.from_url(url))
        relay.follow(job_id, connection)   # connection.on_catchup(job_id) follows
    """

    def __init__(self, client: redis.Redis, watcher: Watcher | None = None, *,
                 lost_after_s: float = 2.0) -> None:
        self.redis = client
        self.watcher = watcher or Watcher()
        #: Redis unreachable this long counts as lost (see :meth:`Watcher.on_redis_lost`).
        self.lost_after_s = lost_after_s
        self.followers: dict[str, set[Follower]] = defaultdict(set)
        # Subscribe commands queued or sent whose confirmation has not come back.
        self.unconfirmed: dict[str, int] = defaultdict(int)
        self.commands: deque[tuple[str, str]] = deque()
        self.reader: gevent.Greenlet | None = None
        #: The Redis server's run id when last connected; another one means it restarted.
        self.run_id: str | None = None
        #: The watcher was told of the current outage (not to be told twice).
        self.lost = False
        #: When Redis last answered on the pub/sub connection (monotonic seconds).
        self.heard = time.monotonic()
        # Written to when commands are queued: wakes the reader wherever it
        # waits.  Made by the process that runs the reader (see start()).
        self._wake_r = self._wake_w = -1
        self._woken = False

    def start(self) -> None:
        """Start listening, if not already; never blocks."""
        if self.reader is None or self.reader.dead:
            if self._wake_r < 0:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                os.set_blocking(self._wake_w, False)
            self.reader = gevent.spawn(self._run)

    def follow(self, job_id: str, follower: Follower) -> None:
        """Start delivering ``job_id``'s events to ``follower``; never blocks.

        The follower gets :meth:`Follower.on_catchup` once the subscription is
        live, then every event as it is published.
        """
        self.start()
        first = not self.followers[job_id]
        self.followers[job_id].add(follower)
        if first:
            self.unconfirmed[job_id] += 1
            self.commands.append(("subscribe", keys.wake(job_id)))
            self._wake()
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
            self._wake()

    def _wake(self) -> None:
        # One byte per wait is enough; the reader sends everything queued.
        if not self._woken and self._wake_w >= 0:
            self._woken = True
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full: the reader has plenty to wake it

    def _run(self) -> None:
        down_since: float | None = None
        while True:
            pubsub = self.redis.pubsub()
            try:
                # A channel of our own keeps the connection subscribed, so
                # get_message() always has a connection to wait on.
                pubsub.subscribe(keys.relay_channel(uuid.uuid4().hex), keys.REVOKED)
                self._resubscribe(pubsub)
                down_since = None
                self._listen(pubsub)
            except Exception as e:  # the reader must outlive anything
                now = time.monotonic()
                if down_since is None:
                    # A silent connection has been down since Redis last spoke.
                    down_since = min(now, self.heard)
                    log.warning("relay lost its Redis connection (%r); reconnecting", e,
                                exc_info=not isinstance(e, (redis.ConnectionError,
                                                            redis.TimeoutError, OSError)))
                if not self.lost and now - down_since >= self.lost_after_s:
                    self.lost = True
                    log.error("Redis unreachable for %.1fs; telling clients to reconnect",
                              now - down_since)
                    self.watcher.on_redis_lost()
                gevent.sleep(RETRY_S)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        self.heard = next_ping = time.monotonic()
        while True:
            self._send_commands(pubsub)
            message = pubsub.get_message(timeout=0)
            if message is None:
                # Nothing buffered: wait for Redis, a queued command, or the next ping.
                self._wait(pubsub, next_ping - time.monotonic())
                message = pubsub.get_message(timeout=0)
            now = time.monotonic()
            while message is not None:
                self.heard = now
                self._dispatch(message)
                message = pubsub.get_message(timeout=0)
            if now >= next_ping:
                if now - self.heard > DEAD_AFTER_S:
                    raise redis.TimeoutError(f"no reply from Redis for {now - self.heard:.1f}s")
                pubsub.ping()
                next_ping = now + PING_S

    def _wait(self, pubsub: redis.client.PubSub, timeout_s: float) -> None:
        """Wait until the connection is readable, commands are queued, or ``timeout_s`` passes."""
        if self.commands:
            return
        sock = pubsub.connection._sock if pubsub.connection is not None else None
        fds = [self._wake_r] if sock is None else [sock.fileno(), self._wake_r]
        readable, _, _ = gevent.select.select(fds, [], [], max(0.0, timeout_s))
        if self._wake_r in readable or self._woken:
            self._woken = False
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
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
        if not isinstance(channel, bytes):
            return  # a PONG
        if not channel.startswith(keys.WAKE_PREFIX.encode()):
            if channel == keys.REVOKED.encode():
                self._on_revocations(kind, message["data"])
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

    def _on_revocations(self, kind: object, data: object) -> None:
        if kind == "message" and isinstance(data, bytes):
            self.watcher.on_revoked(data.decode())
        elif kind == "subscribe":
            # A new connection (ours, or one redis-py remade on its own): keys
            # revoked while nobody listened must be found, and a restarted
            # Redis may have lost the jobs our sockets follow.  Asked from
            # another greenlet: a call that hangs (Redis went silent again)
            # must not stop this one from noticing.
            gevent.spawn(self._after_reconnect)

    def _after_reconnect(self) -> None:
        if self._restarted() and not self.lost:
            self.watcher.on_redis_lost()
        self.lost = False
        self.watcher.on_watching()

    def _restarted(self) -> bool:
        try:
            run_id = str(self.redis.info("server")["run_id"])
        except (redis.RedisError, KeyError):
            return False  # INFO may be disabled; then only a long outage counts
        restarted = self.run_id is not None and run_id != self.run_id
        self.run_id = run_id
        return restarted
