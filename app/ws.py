"""The WebSocket endpoint: one receive loop and one writer greenlet per socket.

Every frame is metered before it is read (see :mod:`tasks.frames`), and
every frame that cannot be served is answered with an ``error`` frame with a
stable code — an unexpected exception included (``internal``), which leaves
the socket open.  Nothing escapes the route: anything that did would make
Flask write an HTTP 500 response onto the upgraded socket.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from flask import Blueprint, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from app import metrics
from app.admission import AdmissionRejectedError
from app.apikeys import Authenticator, KeyInfo, bearer_token
from app.frontend import FrontEnd
from app.intake import Intake
from app.protocol import Auth, Bulk, Cancel, Generate, ProtocolError, Request, Resume, parse
from app.relay import Relay
from app.socket_bulks import SocketBulks
from app.sockets import Sockets
from app.writer import AUTH_TIMEOUT, UNAUTHORIZED, Closing, SocketWriter
from app.wsserver import InlineServer, use_with_flask_sock
from tasks.bulk import BulkEngine
from tasks.config import Settings
from tasks.events import EventLog
from tasks.frames import FrameBucket, FrameBudget, FrameBudgetExceededError
from tasks.jobs import FINAL, JobStore

log = logging.getLogger(__name__)
use_with_flask_sock()
sock = Sock()
bp = Blueprint("ws", __name__)
#: A resume costs one frame plus one per this many events it replays.
REPLAY_EVENTS_PER_FRAME = 50
#: A bulk costs one frame plus one per this many items: an item costs the front
#: end a validation, a share of one pipelined write and a follow, much less than
#: a ``generate`` (its admission is the pump's), but not nothing.
BULK_ITEMS_PER_FRAME = 10


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
    """One client socket: reads and serves requests; its writer sends and follows jobs."""

    def __init__(self, ws: Any, *, settings: Settings, auth: Authenticator, intake: Intake,
                 jobs: JobStore, events: EventLog, relay: Relay, frames: FrameBudget,
                 sockets: Sockets, bulk: BulkEngine, key: KeyInfo | None) -> None:
        self.ws = ws
        self.settings = settings
        self.auth = auth
        self.intake = intake
        self.jobs = jobs
        self.frames = frames
        self.sockets = sockets
        self.writer = SocketWriter(ws, events=events, jobs=jobs, relay=relay)
        self.bulks = SocketBulks(bulk, self.writer, max_follows=settings.max_follows_per_socket)
        self.bucket = FrameBucket(settings.socket_frames_per_s, settings.socket_frame_burst)
        #: Who the socket acts for; ``None`` until an ``auth`` frame succeeds.
        self.key = key

    def serve(self) -> None:
        """Run the socket until the client goes away or the socket is closed."""
        self.writer.start()
        self.sockets.add(self)
        metrics.OPEN_SOCKETS.inc()
        try:
            self._receive()
        except ConnectionClosed:
            pass
        finally:
            self.sockets.discard(self)
            closing = self.writer.closing
            self.writer.finish()
            metrics.OPEN_SOCKETS.dec()
            unfinished = self.writer.unfollow_all()
            cancel = self.settings.cancel_on_disconnect or bool(closing and closing.cancel_jobs)
            if self.key is not None:
                self.bulks.closed(self.key.key_id, unfinished, cancel=cancel)
            if cancel:
                self._cancel_all(unfinished)

    def close(self, closing: Closing) -> None:
        """Say why and close the socket; no frame is served after this.  Never blocks."""
        self.writer.close(closing)

    def following_jobs(self) -> bool:
        """Whether the socket follows any job now."""
        return bool(self.writer.following)

    def _receive(self) -> None:
        deadline = time.monotonic() + self.settings.auth_timeout_s
        while self.writer.closing is None:
            timeout = None
            if self.key is None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    metrics.REQUESTS_REJECTED.labels("auth_timeout").inc()
                    self.close(Closing.error(AUTH_TIMEOUT, ProtocolError(
                        "auth_timeout", f"no 'auth' frame within "
                        f"{self.settings.auth_timeout_s:g}s of connecting").frame()))
                    return
            text = self.ws.receive(timeout=timeout)
            if text is not None and self.writer.closing is None:
                self._handle(text)

    def _cancel_all(self, job_ids: list[str]) -> None:
        try:
            for job_id in job_ids:
                self.jobs.request_cancel(job_id)
        except redis.RedisError as e:
            log.warning("could not cancel the jobs of a closed socket: %s", e)

    # -- requests ---------------------------------------------------------
    def _handle(self, text: str | bytes) -> None:
        """Serve one frame; whatever happens, answer it and keep the socket."""
        req: Request | None = None
        try:
            wait_s = self.bucket.take()
            if wait_s:
                raise ProtocolError("rate_limited", f"this socket sent more than "
                                    f"{self.settings.socket_frame_burst} frames at "
                                    f"{self.settings.socket_frames_per_s:g}/s; retry in "
                                    f"{wait_s:.3f}s", retry_after=round(wait_s, 3),
                                    scope="socket")
            req = parse(text, self.settings)
            if isinstance(req, Auth):
                self._auth(req)
            elif self.key is None:
                self._unauthorized(req.ref, "send an 'auth' frame with your API key first, "
                                   "or an Authorization header on the handshake")
            elif isinstance(req, Generate):
                self._generate(req)
            elif isinstance(req, Bulk):
                self._bulk(req)
            elif isinstance(req, Resume):
                self._resume(req)
            else:
                self._cancel(req)
        except ProtocolError as e:
            if e.ref is None and req is not None:
                e.ref = req.ref
            self._reject(e)
        except AdmissionRejectedError as e:
            metrics.REQUESTS_REJECTED.labels(e.code).inc()
            self.writer.send(e.frame(req.ref if req else None))
        except redis.RedisError as e:
            log.warning("request failed: Redis unavailable: %s", e)
            self._reject(ProtocolError("unavailable", "the gateway cannot reach Redis; "
                                       "retry shortly", req.ref if req else None))
        except Exception:
            # Each request undoes its own partial work (see Intake.submit); what
            # is left is to say so and keep serving.
            log.exception("serving a %s frame failed", type(req).__name__ if req else "client")
            self._reject(ProtocolError("internal", "the gateway failed to serve this frame; "
                                       "the error is logged", req.ref if req else None))

    def _auth(self, req: Auth) -> None:
        if self.key is not None:
            raise ProtocolError("bad_frame", "this socket is already authenticated")
        key = self.auth.authenticate(req.key)
        if key is None:
            self._unauthorized(req.ref, "invalid or revoked API key")
            return
        self.key = key
        self.writer.send(json.dumps({"type": "authenticated", "ref": req.ref,
                                     "key_id": key.key_id, "tier": key.tier}))

    def _unauthorized(self, ref: Any, message: str) -> None:
        metrics.REQUESTS_REJECTED.labels("unauthorized").inc()
        self.close(Closing.error(UNAUTHORIZED,
                                 ProtocolError("unauthorized", message, ref).frame()))

    def _reject(self, error: ProtocolError) -> None:
        metrics.REQUESTS_REJECTED.labels(error.code).inc()
        self.writer.send(error.frame())

    def _spend(self, cost: float = 1.0) -> None:
        """Charge the key's frame budget (one round trip), or refuse the frame."""
        assert self.key is not None
        try:
            wait_s = self.frames.take(self.key.key_id, self.key.tier, cost)
        except (redis.ConnectionError, redis.TimeoutError):
            if self.settings.admission_fail_open:
                return
            raise
        if wait_s:
            raise self._over_frame_budget(wait_s)

    @staticmethod
    def _over_frame_budget(wait_s: float) -> ProtocolError:
        return ProtocolError("rate_limited", f"this API key's sockets used up their frame "
                             f"budget; retry in {wait_s:.3f}s", retry_after=wait_s, scope="key")

    def _charge(self, cost: float, what: str) -> None:
        """Charge a frame that costs more than one to both budgets (its first frame is
        taken already), or refuse it."""
        wait_s = self.bucket.take(cost - 1)
        if wait_s:
            raise ProtocolError("rate_limited", f"{what} costs this socket {cost:.1f} frames; "
                                f"retry in {wait_s:.3f}s", retry_after=round(wait_s, 3),
                                scope="socket")
        self._spend(cost)

    def _check_follow_limit(self) -> None:
        limit = self.settings.max_follows_per_socket
        if len(self.writer.following) >= limit:
            raise ProtocolError("follow_limit", f"this socket follows {limit} jobs, its "
                                "limit; wait for one to end, or open another socket")

    def _generate(self, req: Generate) -> None:
        self._check_follow_limit()
        accepted = time.monotonic()
        assert self.key is not None
        try:
            # The frame is metered in admission's call, one round trip for both.
            submitted = self.intake.submit(self.key, req.spec,
                                           max_tokens_given=req.max_tokens_given,
                                           frame=self.frames.charge(self.key.key_id,
                                                                    self.key.tier))
        except FrameBudgetExceededError as e:
            raise self._over_frame_budget(e.wait_s) from None
        except AdmissionRejectedError as e:
            if not e.frame_taken:
                self._spend()  # refused before its frame was metered: a refusal costs one too
            if e.code != "rate_limited" or not e.queueable or req.spec.session:
                raise
            self.bulks.hold(self.key, req, e, accepted)
            return
        job_id = submitted.job_id
        metrics.JOBS_SUBMITTED.inc()
        # Enqueued before it is answered: from here on the worker settles the
        # job, so nothing that fails below can leak its slot.  Its events reach
        # the client only once followed, after ``queued``.
        self.intake.start(submitted)
        queued: dict[str, Any] = {"type": "queued", "ref": req.ref, "job_id": job_id,
                                  "position": submitted.position}
        if submitted.limits is not None:
            queued["limits"] = submitted.limits.as_dict()
        self.writer.send(json.dumps(queued))
        self.writer.follow(job_id, 0, accepted_at=accepted)

    def _bulk(self, req: Bulk) -> None:
        self.bulks.check(req)
        self._charge(1 + len(req.items) / BULK_ITEMS_PER_FRAME,
                     f"a bulk of {len(req.items)} items")
        assert self.key is not None
        self.bulks.submit(self.key, req)

    def _resume(self, req: Resume) -> None:
        following = self.writer.following
        if req.job_id in following:
            raise ProtocolError("already_following", f"this socket already follows job "
                                f"{req.job_id}; its events keep coming from seq "
                                f"{following[req.job_id]}")
        self._check_follow_limit()
        owner, status, events = self.jobs.progress(req.job_id)
        if owner is None:
            # A bulk item not started yet (or ended without running) has no record.
            owner = self.bulks.engine.owner_of(req.job_id)
        self._check_owner(req.job_id, owner)
        last = events - 1
        if req.after > last or (req.after == last and status in FINAL):
            raise ProtocolError("out_of_range", f"job {req.job_id!r} has no events after "
                                f"{req.after}: its last seq is {last}"
                                + (" and it has ended" if status in FINAL else ""))
        # A replay costs in proportion to what it sends back.
        self._charge(1 + (last - req.after) / REPLAY_EVENTS_PER_FRAME,
                     f"replaying {last - req.after} events")
        self.writer.follow(req.job_id, req.after + 1)

    def _cancel(self, req: Cancel) -> None:
        self._spend()
        assert self.key is not None
        if req.bulk_id is not None:
            self.bulks.cancel_bulk(self.key.key_id, req.bulk_id)
            return
        assert req.job_id is not None
        owner = self.jobs.owner_of(req.job_id)
        if self.bulks.cancel_job(self.key.key_id, req.job_id, owner):
            return
        self._check_owner(req.job_id, owner)
        self.jobs.request_cancel(req.job_id)

    def _check_owner(self, job_id: str, owner: str | None = None) -> None:
        # Another key's job is answered like a missing one: ids do not leak.
        assert self.key is not None
        if (owner or self.jobs.owner_of(job_id)) != self.key.key_id:
            raise ProtocolError("unknown_job", f"no job {job_id!r}: it never existed, its "
                                "log has expired, or it belongs to another key")


@sock.route("/ws", bp=bp)  # type: ignore[untyped-decorator]
def websocket(ws: InlineServer) -> None:
    """Serve one client socket (see the wire protocol in README.rst).

    flask-sock accepts the upgrade with an :class:`~app.wsserver.InlineServer`
    (see :func:`app.wsserver.use_with_flask_sock`), so the socket is read by
    this (gunicorn's handler) greenlet, in ``ws.receive()``; its writer
    greenlet sends.
    """
    front: FrontEnd = current_app.extensions["sluice"]
    # The relay must listen (for revocations) before any socket can be served.
    front.relay.start()
    try:
        Connection(ws, settings=front.settings, auth=front.auth, intake=front.intake,
                   jobs=front.jobs, events=front.events, relay=front.relay,
                   frames=front.frames, sockets=front.sockets,
                   bulk=current_app.extensions["sluice_bulk"], key=g.sluice_key).serve()
    except Exception:  # see the module docstring
        log.exception("a socket failed; closing it")
        try:
            ws.close(reason=1011, message="internal error")
        except Exception:  # noqa: BLE001 - flask-sock closes it again; nothing to add
            pass
