"""One HTTP request's follow of one job: the job's events, in seq order, to its end.

A :class:`JobFeed` is the HTTP path's :class:`~app.relay.Follower`, as the
socket's connection is the WebSocket path's: the relay hands it live events
from its reader greenlet, and the request's own greenlet takes them off a
queue in seq order, reading the job's log whenever it is behind (it subscribed
late, the relay reconnected, or its queue overflowed).  So an HTTP response is
fed by exactly the machinery a socket is, and never blocks the relay.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import gevent
from gevent.queue import Empty, Full, Queue

from app import metrics
from app.relay import Relay
from tasks.events import TERMINAL, EventLog, frame_kind

log = logging.getLogger(__name__)

#: Live events one feed holds before it drops them and reads its log instead.
INBOX_EVENTS = 1000
_CATCHUP = -1   # "read the log from your position"
_HANGUP = -2    # the client went away


class ClientGoneError(Exception):
    """The client closed its connection while the request waited for its job."""


class JobFeed:
    """Follows one job for one request; iterate :meth:`frames` in the request's greenlet.

    Example::

        with JobFeed(job_id, relay, events) as feed:
            for frame in feed.frames(idle_s=15):
                ...                     # None after idle_s without an event
    """

    def __init__(self, job_id: str, relay: Relay, events: EventLog) -> None:
        self.job_id = job_id
        self.relay = relay
        self.events = events
        self.inbox: Queue[tuple[int, str]] = Queue(INBOX_EVENTS)
        #: The next seq this request should get.
        self.next_seq = 0
        #: Whether a terminal event (``done`` or ``error``) was delivered.
        self.ended = False
        self.lagging = False
        self.following = False
        self.watcher: gevent.Greenlet | None = None

    def __enter__(self) -> JobFeed:
        self.relay.follow(self.job_id, self)
        self.following = True
        metrics.FOLLOWED_JOBS.inc()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop following the job and watching the client (idempotent; never raises)."""
        if self.watcher is not None:
            # Killed before the request goes on: a watcher still waiting on
            # the socket would make the server's read of the next request on
            # this connection fail (one reader per gevent socket).
            self.watcher.kill()
            self.watcher = None
        if self.following:
            self.following = False
            self.relay.unfollow(self.job_id, self)
            metrics.FOLLOWED_JOBS.dec()

    def watch_hangup(self, client: socket.socket | None) -> None:
        """Stop :meth:`frames` with :class:`ClientGoneError` when ``client`` closes its end.

        A request that writes nothing for a while (waiting in the queue, or a
        non-streaming one) would otherwise notice a vanished client only when
        it finally writes.
        """
        if client is not None:
            self.watcher = gevent.spawn(self._watch, client)

    def _watch(self, client: Any) -> None:
        try:
            # Peeking leaves any pipelined next request for the server to read.
            if client.recv(1, socket.MSG_PEEK):
                return  # the client is talking, so it is there
        except ValueError:
            return  # a TLS socket takes no flags: the next write tells instead
        except OSError:
            pass
        self._put((_HANGUP, ""))

    # -- relay callbacks (its reader greenlet; must not block) -------------
    def on_event(self, job_id: str, seq: int, frame: str) -> None:
        """Queue a live event."""
        self._put((seq, frame))

    def on_catchup(self, job_id: str) -> None:
        """Ask for a read of the job's log from our position."""
        self._put((_CATCHUP, ""))

    def _put(self, item: tuple[int, str]) -> None:
        try:
            self.inbox.put_nowait(item)
        except Full:
            # Dropped events are read back from the log once the inbox drains;
            # a hangup is noticed when the request next writes.
            self.lagging = True

    # -- the request's side ------------------------------------------------
    def frames(self, idle_s: float | None = None) -> Iterator[str | None]:
        """The job's frames from seq 0, in order, until its ``done`` or ``error`` frame.

        :param idle_s: yield ``None`` after this long without an event (a
            keep-alive moment); ``None`` waits as long as it takes.
        :raises ClientGoneError: the watched client went away.
        :raises redis.RedisError: the job's log cannot be read.
        """
        while not self.ended:
            if self.lagging and self.inbox.empty():
                self.lagging = False
                yield from self._read_log()
                continue
            try:
                seq, frame = self.inbox.get(timeout=idle_s)
            except Empty:
                yield None
                continue
            if seq == self.next_seq:
                yield self._take(seq, frame)
            elif seq == _HANGUP:
                raise ClientGoneError(self.job_id)
            elif seq == _CATCHUP or seq > self.next_seq:
                yield from self._read_log()

    def _read_log(self) -> Iterator[str]:
        for seq, frame in self.events.read(self.job_id, self.next_seq - 1):
            yield self._take(seq, frame)
            if self.ended:
                return

    def _take(self, seq: int, frame: str) -> str:
        self.next_seq = seq + 1
        if frame_kind(frame) in TERMINAL:
            self.ended = True
            self.close()
        return frame
