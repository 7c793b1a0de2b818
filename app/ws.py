"""The WebSocket endpoint: one receive loop and one writer greenlet per socket."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import gevent
import redis
from flask import Blueprint, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from flask_sock import Sock
from gevent.queue import Full, Queue
from simple_websocket import ConnectionClosed

from app import metrics
from app.admission import AdmissionRejectedError
from app.apikeys import Authenticator, KeyInfo, bearer_token
from app.frontend import FrontEnd
from app.intake import Intake
from app.protocol import Auth, Cancel, Generate, ProtocolError, Resume, parse
from app.relay import Relay
from tasks.config import Settings
from tasks.events import TERMINAL, EventLog, frame_kind
from tasks.jobs import FINAL, JobStore

log = logging.getLogger(__name__)
sock = Sock()
bp = Blueprint("ws", __name__)
OUTBOX_FRAMES = 10_000
UNAUTHORIZED = 4401


@bp.before_request
def authenticate_handshake() -> ResponseReturnValue | None:
    """Refuse a bad ``Authorization`` header with HTTP 401 before the upgrade.

    A handshake without one is accepted; its first frame must then be ``auth``
    (browsers cannot set headers on a WebSocket), unless anonymous use is on.
    """
    front: FrontEnd = current_app.extensions["sluice"]
    token = bearer_token(request.headers.get("Authorization", ""))
    try:
        g.sluice_key = front.auth.authenticate(token)
    except redis.RedisError:
        return jsonify(error={"code": "unavailable", "message": "cannot reach Redis"}), 503
    if token is not None and g.sluice_key is None:
        metrics.REQUESTS_REJECTED.labels("unauthorized").inc()
        return jsonify(error={"code": "unauthorized",
                              "message": "invalid or revoked API key"}), 401
    return None


class Connection:
    """One client socket: reads requests, writes frames, follows jobs.

    Only the writer greenlet sends (flask-sock's send is not safe to call
    from two greenlets).  Live events that do not fit in the outbox are
    dropped and read back from the job's log: a slow client costs memory in
    Redis, not in this process.
    """

    def __init__(self, ws: Any, *, settings: Settings, auth: Authenticator, intake: Intake,
                 jobs: JobStore, events: EventLog, relay: Relay, key: KeyInfo | None) -> None:
        self.ws = ws
        self.settings = settings
        self.auth = auth
        self.intake = intake
        self.jobs = jobs
        self.events = events
        self.relay = relay
        #: Who the socket acts for; ``None`` until an ``auth`` frame succeeds.
        self.key = key
        self.outbox: Queue[tuple[str, str, int, str]] = Queue(OUTBOX_FRAMES)
        #: job id -> the next seq this client should receive
        self.following: dict[str, int] = {}
        self.lagging: set[str] = set()
        #: jobs this socket submitted and has not yet sent a token of -> accepted at
        self.accepted_at: dict[str, float] = {}
        #: set when the socket must close, with (code, reason)
        self.closing: tuple[int, str] | None = None

    def serve(self) -> None:
        """Run the socket until the client goes away."""
        writer = gevent.spawn(self._write)
        writer.link_exception(self._writer_died)
        metrics.OPEN_SOCKETS.inc()
        try:
            while True:
                text = self.ws.receive()
                if text is None:
                    break
                if not self._handle(text):
                    break
        except ConnectionClosed:
            pass
        finally:
            if self.closing:
                self._close(*self.closing, writer)
            writer.kill()
            metrics.OPEN_SOCKETS.dec()
            metrics.FOLLOWED_JOBS.dec(len(self.following))
            for job_id in list(self.following):
                self.relay.unfollow(job_id, self)
            if self.settings.cancel_on_disconnect:
                self._cancel_unfinished()

    def _writer_died(self, writer: gevent.Greenlet) -> None:
        # A socket that can no longer send must not go on taking requests.
        log.error("socket writer died: %r; closing the socket", writer.exception)
        try:
            self.ws.close(reason=1011, message="internal error")
        except ConnectionClosed:
            pass

    def _cancel_unfinished(self) -> None:
        try:
            for job_id in self.following:
                self.jobs.request_cancel(job_id)
        except redis.RedisError as e:
            log.warning("could not cancel the jobs of a closed socket: %s", e)

    # -- requests ---------------------------------------------------------
    def _handle(self, text: str | bytes) -> bool:
        """Serve one frame; return False when the socket must close."""
        try:
            req = parse(text, self.settings)
        except ProtocolError as e:
            self._reject(e)
            return True
        try:
            if isinstance(req, Auth):
                return self._auth(req)
            if self.key is None:
                return self._unauthorized(req.ref, "send an 'auth' frame with your API key "
                                          "first, or an Authorization header on the handshake")
            if isinstance(req, Generate):
                self._generate(req)
            elif isinstance(req, Resume):
                self._resume(req)
            else:
                self._cancel(req)
        except ProtocolError as e:
            e.ref = req.ref
            self._reject(e)
        except AdmissionRejectedError as e:
            metrics.REQUESTS_REJECTED.labels(e.code).inc()
            self._send_now(e.frame(req.ref))
        except redis.RedisError as e:
            log.warning("request failed: Redis unavailable: %s", e)
            self._reject(ProtocolError("unavailable", "the gateway cannot reach Redis; "
                                       "retry shortly", req.ref))
        return True

    def _auth(self, req: Auth) -> bool:
        key = self.auth.authenticate(req.key)
        if key is None:
            return self._unauthorized(req.ref, "invalid or revoked API key")
        self.key = key
        self._send_now(json.dumps({"type": "authenticated", "ref": req.ref,
                                   "key_id": key.key_id, "tier": key.tier}))
        return True

    def _unauthorized(self, ref: Any, message: str) -> bool:
        self._reject(ProtocolError("unauthorized", message, ref))
        self.closing = (UNAUTHORIZED, "unauthorized")
        return False

    def _reject(self, error: ProtocolError) -> None:
        metrics.REQUESTS_REJECTED.labels(error.code).inc()
        self._send_now(error.frame())

    def _generate(self, req: Generate) -> None:
        accepted = time.monotonic()
        assert self.key is not None
        submitted = self.intake.submit(self.key, req.spec, max_tokens_given=req.max_tokens_given)
        job_id = submitted.job_id
        metrics.JOBS_SUBMITTED.inc()
        self.accepted_at[job_id] = accepted
        queued: dict[str, Any] = {"type": "queued", "ref": req.ref, "job_id": job_id,
                                  "position": submitted.position}
        if submitted.limits is not None:
            queued["limits"] = submitted.limits.as_dict()
        # ``queued`` goes into the outbox before the job can produce anything.
        self._send_now(json.dumps(queued))
        self.intake.start(submitted)
        # Following after enqueueing is safe: events come from the log once
        # the subscription is live.
        self._follow(job_id, 0)

    def _resume(self, req: Resume) -> None:
        owner, status, events = self.jobs.progress(req.job_id)
        self._check_owner(req.job_id, owner)
        last = events - 1
        if req.after > last or (req.after == last and status in FINAL):
            raise ProtocolError("out_of_range", f"job {req.job_id!r} has no events after "
                                f"{req.after}: its last seq is {last}"
                                + (" and it has ended" if status in FINAL else ""))
        self._follow(req.job_id, req.after + 1)

    def _cancel(self, req: Cancel) -> None:
        self._check_owner(req.job_id)
        self.jobs.request_cancel(req.job_id)

    def _check_owner(self, job_id: str, owner: str | None = None) -> None:
        # Another key's job is answered like a missing one: ids do not leak.
        assert self.key is not None
        if (owner or self.jobs.owner_of(job_id)) != self.key.key_id:
            raise ProtocolError("unknown_job", f"no job {job_id!r}: it never existed, its "
                                "log has expired, or it belongs to another key")

    def _follow(self, job_id: str, next_seq: int) -> None:
        if job_id in self.following:
            self.following[job_id] = min(self.following[job_id], next_seq)
            self._put(("catchup", job_id, 0, ""))
            return
        self.relay.follow(job_id, self)
        self.following[job_id] = next_seq
        metrics.FOLLOWED_JOBS.inc()

    def _close(self, code: int, reason: str, writer: gevent.Greenlet) -> None:
        # Let the writer flush the error frame first; then close with ``code``.
        self.outbox.put(("close", "", 0, ""))
        writer.join(timeout=5)
        try:
            self.ws.close(reason=code, message=reason)
        except ConnectionClosed:
            pass

    # -- relay callbacks (reader greenlet; must not block) -----------------
    def on_event(self, job_id: str, seq: int, frame: str) -> None:
        """Queue a live event for the writer."""
        self._put(("event", job_id, seq, frame))

    def on_catchup(self, job_id: str) -> None:
        """Queue a read of the job's log for the writer."""
        self._put(("catchup", job_id, 0, ""))

    def _put(self, item: tuple[str, str, int, str]) -> None:
        try:
            self.outbox.put_nowait(item)
        except Full:
            if item[1]:
                self.lagging.add(item[1])

    def _send_now(self, frame: str) -> None:
        # Control frames are never dropped: a client that does not read holds
        # up its own receive loop instead.
        self.outbox.put(("frame", "", 0, frame))

    # -- writer ------------------------------------------------------------
    def _write(self) -> None:
        while True:
            try:
                if self.outbox.empty() and self.lagging:
                    for job_id in list(self.lagging):
                        self._catch_up(job_id)
                        self.lagging.discard(job_id)
                what, job_id, seq, frame = self.outbox.get()
                if what == "close":
                    return
                if what == "frame":
                    self.ws.send(frame)
                elif what == "catchup":
                    self._catch_up(job_id)
                elif job_id in self.following:
                    expected = self.following[job_id]
                    if seq == expected:
                        self._deliver(job_id, seq, frame)
                    elif seq > expected:
                        self._catch_up(job_id)
            except ConnectionClosed:
                return
            except redis.RedisError as e:
                # Read the log again once Redis answers; nothing is lost.
                log.warning("catch-up of job %s failed: %s", job_id, e)
                if job_id:
                    self.lagging.add(job_id)
                gevent.sleep(0.5)

    def _catch_up(self, job_id: str) -> None:
        after = self.following.get(job_id)
        if after is None:
            return
        for seq, frame in self.events.read(job_id, after - 1):
            if job_id not in self.following:
                break
            self._deliver(job_id, seq, frame)

    def _deliver(self, job_id: str, seq: int, frame: str) -> None:
        self.ws.send(frame)
        metrics.FRAMES_SENT.inc()
        self.following[job_id] = seq + 1
        kind = frame_kind(frame)
        if job_id in self.accepted_at and kind in ("token", *TERMINAL):
            ttft_s = time.monotonic() - self.accepted_at.pop(job_id)
            if kind == "token":
                metrics.CLIENT_TTFT.observe(ttft_s)
                self.jobs.record_client_ttft(job_id, ttft_s * 1000)
        if kind == "done":
            metrics.observe_done(frame)
        if kind in TERMINAL:
            del self.following[job_id]
            metrics.FOLLOWED_JOBS.dec()
            self.relay.unfollow(job_id, self)


@sock.route("/ws", bp=bp)  # type: ignore[untyped-decorator]
def websocket(ws: Any) -> None:
    """Serve one client socket (see the wire protocol in README.rst)."""
    front: FrontEnd = current_app.extensions["sluice"]
    Connection(ws, settings=front.settings, auth=front.auth, intake=front.intake,
               jobs=front.jobs, events=front.events, relay=front.relay,
               key=g.sluice_key).serve()
