"""A socket's writer: the one greenlet that sends on it, and the jobs the socket follows.

simple_websocket's ``send`` is not safe to call from two greenlets, so everything a
socket says goes through its writer's outbox: control frames (``queued``,
errors) that are never dropped, and live events that are dropped when the
outbox is full and read back from the job's log instead — a slow client
costs memory in Redis, not in this process.

A socket is closed the same way whoever decides it (the socket itself, a
revocation, the loss of Redis, a shutdown): :meth:`SocketWriter.close` with a
:class:`Closing`.  The writer then stops relaying events, sends the control
frames still queued, a last frame saying why — for a ``reconnect``, each
followed job and the last seq the client got, so it can resume elsewhere
with no gap — and the close code.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import gevent
import redis
from gevent.queue import Empty, Full, Queue
from simple_websocket import ConnectionClosed

from app import metrics
from app.relay import Relay
from tasks.events import TERMINAL, EventLog, frame_kind
from tasks.jobs import JobStore

log = logging.getLogger(__name__)
OUTBOX_FRAMES = 10_000
#: Queued items whose frames go out in one write at most.
BURST = 64
#: Events after which a log has no more: a job's end, and a bulk's (its own log).
ENDS = TERMINAL | {"bulk_done"}
#: How long a closing socket may take to say goodbye before it is cut off.
CLOSE_WAIT_S = 5.0
#: The same once Redis is lost.
REDIS_LOST_WAIT_S = 0.5
UNAUTHORIZED = 4401
AUTH_TIMEOUT = 4408
GOING_AWAY = 1001
TRY_AGAIN_LATER = 1013
RECONNECT_MESSAGES = {
    "going_away": "this front end is shutting down: reconnect (to any front end) and "
                  "resume each job after the seq given",
    "unavailable": "the gateway lost its Redis: reconnect in a moment and resume each job "
                   "after the seq given",
}


@dataclass(frozen=True)
class Closing:
    """Why and how a socket closes."""

    code: int
    reason: str
    #: The last frame; ``None`` sends a ``reconnect`` frame listing the followed jobs.
    frame: str | None = None
    #: The ``reconnect`` frame's ``code``.
    reconnect: str = ""
    #: Cancel the socket's unfinished jobs (its key was revoked).
    cancel_jobs: bool = False
    #: How long the writer may take to say goodbye before it is cut off.
    wait_s: float = CLOSE_WAIT_S

    @classmethod
    def error(cls, close_code: int, error_frame: str, *, cancel_jobs: bool = False) -> Closing:
        """Close with an ``error`` frame first."""
        reason = json.loads(error_frame)["code"]
        return cls(close_code, reason, error_frame, cancel_jobs=cancel_jobs)

    @classmethod
    def reconnect_later(cls, code: str, close_code: int) -> Closing:
        """Close telling the client which jobs to resume.

        :param code: ``going_away`` (shutdown) or ``unavailable`` (Redis lost).
        """
        # Once Redis is lost the writer is most likely waiting on it (a log
        # read begun as Redis went silent) and would not be back before Redis
        # answers again: say goodbye without it soon.
        return cls(close_code, code, reconnect=code,
                   wait_s=REDIS_LOST_WAIT_S if code == "unavailable" else CLOSE_WAIT_S)


class SocketWriter:
    """Sends a socket's frames and follows its jobs (the relay's :class:`~app.relay.Follower`).

    Example::

        writer = SocketWriter(ws, events=events, jobs=jobs, relay=relay)
        writer.start()
        writer.send('{"type": "queued", ...}')
        writer.follow(job_id, 0)
    """

    def __init__(self, ws: Any, *, events: EventLog, jobs: JobStore, relay: Relay) -> None:
        self.ws = ws
        self.events = events
        self.jobs = jobs
        self.relay = relay
        #: Frames and events to send; made with the writer greenlet, dropped with it.
        self.outbox: Queue[tuple[str, str, int, str]] | None = None
        #: job id -> the next seq this client should receive
        self.following: dict[str, int] = {}
        self.lagging: set[str] = set()
        #: jobs this socket submitted and has not yet sent a token of -> accepted at
        self.accepted_at: dict[str, float] = {}
        #: Set once the socket must close.
        self.closing: Closing | None = None
        self.said_goodbye = False
        self.greenlet: gevent.Greenlet | None = None
        #: Event frames sent and not yet added to ``sluice_frames_sent_total``.
        self.unreported = 0

    def start(self) -> None:
        """Make the socket ready to send.

        The writer greenlet and its outbox exist only while there is something
        to send or a job to follow: an idle socket costs neither (about 8 KiB
        of a front end's memory per socket).  Whatever is queued starts them.
        """

    def _outbox(self) -> Queue[tuple[str, str, int, str]]:
        """The outbox, with a writer greenlet running to empty it."""
        if self.outbox is None:
            self.outbox = Queue(OUTBOX_FRAMES)
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)
            self.greenlet.link_exception(self._died)
        return self.outbox

    def send(self, frame: str) -> None:
        """Queue a control frame; never dropped (a client that does not read
        holds up its own receive loop instead)."""
        self._outbox().put(("frame", "", 0, frame))

    def follow(self, job_id: str, next_seq: int, accepted_at: float | None = None) -> None:
        """Relay ``job_id``'s events from ``next_seq`` on (a job not followed yet)."""
        self.relay.follow(job_id, self)
        self.following[job_id] = next_seq
        if accepted_at is not None:
            self.accepted_at[job_id] = accepted_at
        metrics.FOLLOWED_JOBS.inc()

    def unfollow_all(self) -> list[str]:
        """Stop following every job; return the ids of those not yet ended."""
        self._report_frames()
        ids = list(self.following)
        for job_id in ids:
            self.relay.unfollow(job_id, self)
        metrics.FOLLOWED_JOBS.dec(len(ids))
        self.following.clear()
        return ids

    def close(self, closing: Closing) -> None:
        """Say why and close the socket; the first call wins.  Never blocks."""
        if self.closing is not None:
            return
        self.closing = closing
        self._put(("wake", "", 0, ""))
        # A client that reads nothing, or a Redis that does not answer, could
        # hold the goodbye up forever.
        gevent.spawn_later(closing.wait_s, self._give_up)

    def finish(self) -> None:
        """Stop the writer; when closing, after its goodbye (said without it if it is stuck)."""
        if self.greenlet is None:
            return
        if self.closing is not None:
            self.greenlet.join(timeout=self.closing.wait_s)
            self._give_up()
        self.greenlet.kill()

    # -- relay callbacks (reader greenlet; must not block) -----------------
    def on_event(self, job_id: str, seq: int, frame: str) -> None:
        """Queue a live event."""
        self._put(("event", job_id, seq, frame))

    def on_catchup(self, job_id: str) -> None:
        """Queue a read of the job's log."""
        self._put(("catchup", job_id, 0, ""))

    def _put(self, item: tuple[str, str, int, str]) -> None:
        try:
            self._outbox().put_nowait(item)
        except Full:
            if item[1]:
                self.lagging.add(item[1])

    # -- the writer greenlet ------------------------------------------------
    def _run(self) -> None:
        outbox = self.outbox
        assert outbox is not None
        while self.closing is None:
            job_id = ""
            try:
                if outbox.empty() and self.lagging:
                    for job_id in list(self.lagging):
                        self._catch_up(job_id)
                        self.lagging.discard(job_id)
                if outbox.empty() and not self.following and not self.lagging:
                    # Nothing to send or follow: end; the next frame starts a writer.
                    self.greenlet = None
                    self.outbox = None
                    return
                item = outbox.get()
                job_id = item[1]
                if outbox.empty() and item[0] != "catchup":
                    self._handle(item)  # one frame: as it is
                    continue
                # A log read, or items queued behind this one: their frames in one write.
                self.ws.sock.hold()
                for n in range(BURST):
                    if n:
                        if outbox.empty() or self.closing is not None:
                            break
                        item = outbox.get_nowait()
                        job_id = item[1]
                    self._handle(item)
                self.ws.sock.flush()
            except ConnectionClosed:
                self.ws.sock.drop()
                return
            except redis.RedisError as e:
                self.ws.sock.flush()
                # Read the log again once Redis answers; nothing is lost.
                log.warning("catch-up of job %s failed: %s", job_id, e)
                if job_id:
                    self.lagging.add(job_id)
                gevent.sleep(0.5)
        self._goodbye(self.closing)

    def _handle(self, item: tuple[str, str, int, str]) -> None:
        what, job_id, seq, frame = item
        if what == "frame":
            self.ws.send(frame)
        elif what == "catchup":
            self._catch_up(job_id)
        elif what == "event" and job_id in self.following:
            expected = self.following[job_id]
            if seq == expected:
                self._deliver(job_id, seq, frame)
            elif seq > expected:
                self._catch_up(job_id)

    def _catch_up(self, job_id: str) -> None:
        after = self.following.get(job_id)
        if after is None:
            return
        for seq, frame in self.events.read(job_id, after - 1):
            if job_id not in self.following or self.closing is not None:
                break
            self._deliver(job_id, seq, frame)

    def _deliver(self, job_id: str, seq: int, frame: str) -> None:
        self.ws.send(frame)
        # Counted once per job (a Prometheus increment takes a lock, and a
        # file write when several processes share the metrics).
        self.unreported += 1
        self.following[job_id] = seq + 1
        kind = frame_kind(frame)
        if job_id in self.accepted_at and kind in ("token", *TERMINAL):
            ttft_s = time.monotonic() - self.accepted_at.pop(job_id)
            if kind == "token":
                metrics.CLIENT_TTFT.observe(ttft_s)
                self.jobs.record_client_ttft(job_id, ttft_s * 1000)
        if kind == "done":
            metrics.observe_done(frame)
        if kind in ENDS:
            del self.following[job_id]
            metrics.FOLLOWED_JOBS.dec()
            self.relay.unfollow(job_id, self)
            self._report_frames()

    def _report_frames(self) -> None:
        if self.unreported:
            metrics.FRAMES_SENT.inc(self.unreported)
            self.unreported = 0

    def _goodbye(self, closing: Closing) -> None:
        if self.said_goodbye:
            return
        self.said_goodbye = True
        try:
            # Control frames already queued still go out; events do not: the
            # reconnect frame says where each job stands.
            while self.outbox is not None:
                try:
                    what, _, _, frame = self.outbox.get_nowait()
                except Empty:
                    break
                if what == "frame":
                    self.ws.send(frame)
            self.ws.send(closing.frame or json.dumps({
                "type": "reconnect", "code": closing.reconnect,
                "message": RECONNECT_MESSAGES.get(closing.reconnect, closing.reason),
                "jobs": {job_id: seq - 1 for job_id, seq in self.following.items()}}))
            self.ws.close(reason=closing.code, message=closing.reason)
        except ConnectionClosed:
            pass
        finally:
            self._wake_receiver()

    def _died(self, writer: gevent.Greenlet) -> None:
        # A socket that can no longer send must not go on taking requests.
        log.error("socket writer died: %r; closing the socket", writer.exception)
        try:
            self.ws.close(reason=1011, message="internal error")
        except ConnectionClosed:
            pass
        self._wake_receiver()

    def _give_up(self) -> None:
        # The writer is stuck: in a Redis read (Redis went silent), or in a send
        # to a client that reads nothing.  Say goodbye without it if possible.
        if self.greenlet is not None and not self.greenlet.dead and self.closing is not None:
            log.warning("a socket's writer did not close it within %ss; closing it without",
                        self.closing.wait_s)
            self.greenlet.kill()
            with gevent.Timeout(CLOSE_WAIT_S, False):
                self._goodbye(self.closing)
            self.ws.connected = False  # simple_websocket's own flag: stop serving it
        self._wake_receiver()

    def _wake_receiver(self) -> None:
        # The socket's greenlet waits in receive() for the peer to send
        # something; a dead or silent peer would leave it (and its follows)
        # behind.  Once the connection is closed, a woken receive() raises
        # ConnectionClosed (see app.wsserver.Wakeup).
        event = getattr(self.ws, "event", None)
        if event is not None:
            event.set()
