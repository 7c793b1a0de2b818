"""The OpenAI-compatible HTTP API: chat and text completions, streamed or not, and models.

An HTTP request is one more follower of its job's event log.  It is
authenticated, admitted and submitted through the same :class:`~app.intake.Intake`
as a socket's ``generate``, runs on the same queue and workers, and its
response is fed through the process's :class:`~app.relay.Relay` by a
:class:`~app.job_feed.JobFeed`, in the request's own greenlet.  Streamed
answers are Server-Sent Events in OpenAI's chunk format; a token's chunk is
its stored frame's text spliced between a prefix and a suffix rendered once
per request, so relaying it costs no JSON work.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app import metrics
from app.admission import AdmissionRejectedError
from app.apikeys import KeyInfo, bearer_token
from app.completion import Completion, token_json
from app.frontend import FrontEnd
from app.intake import Submitted
from app.job_feed import ClientGoneError, JobFeed
from app.openai_request import ApiError, parse
from app.protocol import Generate
from tasks.bulk import BulkEngine, BulkRejectedError, Held, ItemError
from tasks.events import frame_kind
from tasks.jobs import JobStore

log = logging.getLogger(__name__)
bp = Blueprint("openai_api", __name__)

#: A stream quiet this long gets an SSE comment, so proxies keep it open.
KEEPALIVE_S = 15.0
#: HTTP status of a non-streamed job that ended with an error, by its code (else 502).
JOB_STATUS = {"cancelled": 409, "timeout": 504, "unavailable": 503, "rate_limited": 429}
DONE = b"data: [DONE]\n\n"


@bp.errorhandler(ApiError)
def _render(e: ApiError) -> ResponseReturnValue:
    if e.refused:
        metrics.REQUESTS_REJECTED.labels(e.code).inc()
    return jsonify(e.body()), e.status, e.headers


@bp.post("/v1/chat/completions")
def chat_completions() -> ResponseReturnValue:
    """Create a chat completion: ``chat.completion``, or SSE chunks when ``stream`` is true."""
    return _complete(chat=True)


@bp.post("/v1/completions")
def completions() -> ResponseReturnValue:
    """Create a (legacy) text completion from a ``prompt`` string."""
    return _complete(chat=False)


@bp.get("/v1/models")
def models() -> ResponseReturnValue:
    """The configured models, in OpenAI's list shape."""
    front = _front()
    key = _authenticate(front)
    return (jsonify(object="list", data=[_model(m) for m in front.settings.model_names]),
            200, _limit_headers(front, key))


@bp.get("/v1/models/<path:name>")
def model(name: str) -> ResponseReturnValue:
    """One configured model; 404 for any other name."""
    front = _front()
    key = _authenticate(front)
    if name not in front.settings.model_names:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}; available: "
                       f"{', '.join(front.settings.model_names)}", "model",
                       _limit_headers(front, key))
    return jsonify(_model(name)), 200, _limit_headers(front, key)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sluice"}


def _front() -> FrontEnd:
    front: FrontEnd = current_app.extensions["sluice"]
    return front


def _authenticate(front: FrontEnd) -> KeyInfo:
    token = bearer_token(request.headers.get("Authorization", ""))
    try:
        key = front.auth.authenticate(token)
    except redis.RedisError as e:
        raise ApiError(503, "unavailable", "the gateway cannot reach Redis; retry shortly") from e
    if key is None:
        raise ApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'"
                       if token is None else "invalid or revoked API key")
    return key


def _limit_headers(front: FrontEnd, key: KeyInfo) -> dict[str, str]:
    """The key's ``x-ratelimit-*`` headers, or none when Redis or its tier cannot say."""
    try:
        return front.admission.limits(key).headers()
    except (redis.RedisError, AdmissionRejectedError):
        return {}


def _complete(chat: bool) -> ResponseReturnValue:
    front = _front()
    key = _authenticate(front)
    accepted = time.monotonic()
    try:
        parsed = parse(request, front.settings, chat=chat)
        submitted, held = _submit(front, key, parsed.generate)
    except ApiError as e:
        # Not when Redis is what failed: asking it again would only add its timeout.
        if e.status != 503 and not any(h.startswith("x-ratelimit-") for h in e.headers):
            e.headers.update(_limit_headers(front, key))
        raise
    headers = submitted.limits.headers() if submitted.limits is not None else {}
    completion = Completion(chat, submitted.job_id, submitted.spec, int(time.time()),
                            parsed.include_usage)
    feed = JobFeed(submitted.job_id, front.relay, front.events)
    client = request.environ.get("gunicorn.socket")
    cancel = front.settings.cancel_on_disconnect
    if held:
        # A held request whose client left is dropped while it waits (it was
        # never started); once started, it is cancelled as any request is.
        gone: Callable[[], None] = functools.partial(
            _drop_held, current_app.extensions["sluice_bulk"], key.key_id, submitted.job_id,
            cancel)
    else:
        gone = functools.partial(_cancel, front.jobs, submitted.job_id) if cancel \
            else (lambda: None)
    if parsed.stream:
        chunks = _stream(feed, completion, client, front.jobs, accepted, gone)
        return Response(chunks, mimetype="text/event-stream",
                        headers={**headers, "Cache-Control": "no-cache",
                                 "X-Accel-Buffering": "no"})
    try:
        with feed:
            feed.watch_hangup(client)
            text, done = _wait(feed, headers)
    except ClientGoneError as e:
        raise ApiError(499, "client_closed", "the client closed the connection",
                       refused=False) from e
    except redis.RedisError as e:
        raise ApiError(503, "unavailable", f"the gateway lost Redis while waiting for job "
                       f"{submitted.job_id}; retry shortly", headers=headers,
                       refused=False) from e
    finally:
        if not feed.ended:
            gone()
    return jsonify(completion.body(text, done)), 200, headers


def _submit(front: FrontEnd, key: KeyInfo, generate: Generate) -> tuple[Submitted, bool]:
    """Admit, store and enqueue the job, exactly as a socket's ``generate`` is.

    A request the key's buckets refuse now is held instead when its tier says
    ``queue_instead_of_429`` (see :func:`_hold`).

    :return: the job, and whether it is held.
    """
    try:
        submitted = front.intake.submit(key, generate.spec,
                                        max_tokens_given=generate.max_tokens_given)
    except AdmissionRejectedError as e:
        if e.code == "rate_limited" and e.queueable and not generate.spec.session:
            held = _hold(key, generate)
            if held is not None:
                return held, True
        headers = e.headers()
        if e.retry_after is not None:
            headers["retry-after-ms"] = str(max(1, round(e.retry_after * 1000)))
        raise ApiError(e.http_status, e.code, e.message, headers=headers) from e
    except redis.RedisError as e:
        log.warning("request failed: Redis unavailable: %s", e)
        raise ApiError(503, "unavailable", "the gateway cannot reach Redis; retry shortly") from e
    metrics.JOBS_SUBMITTED.inc()
    front.intake.start(submitted)
    return submitted, False


def _hold(key: KeyInfo, generate: Generate) -> Submitted | None:
    """Hold a refused request as a one-item interactive bulk, as a socket's ``generate`` is.

    The pump starts it as an interactive job once the key's buckets allow;
    held longer than the tier's ``queue_max_wait_s`` its job ends with
    ``rate_limited`` (a 429, or an error chunk when streaming).  Meanwhile a
    streaming response sends SSE keep-alive comments.

    :return: the held job, or ``None`` when it cannot be held (refuse as usual).
    """
    engine: BulkEngine = current_app.extensions["sluice_bulk"]
    tier = engine.admission.tier_of(key)
    try:
        sub = engine.submit(key, [Held(generate.spec, generate.max_tokens_given, None)],
                            kind="interactive", max_items=1,
                            wait_s=tier.queue_max_wait_s)
    except (BulkRejectedError, redis.RedisError):
        return None
    job_id = sub.jobs[0]
    if isinstance(job_id, ItemError):
        raise ApiError(400, job_id.code, job_id.message)
    metrics.JOBS_SUBMITTED.inc()
    return Submitted(job_id, 0, None, generate.spec, enqueued=True)


def _drop_held(engine: BulkEngine, key_id: str, job_id: str, cancel: bool) -> None:
    try:
        engine.cancel_item(key_id, job_id, held_only=not cancel)
    except Exception as e:  # noqa: BLE001 - the request is over either way
        log.warning("could not drop held job %s of a closed request: %r", job_id, e)


def _stream(feed: JobFeed, completion: Completion, client: Any, jobs: JobStore,
            accepted: float, gone: Callable[[], None]) -> Iterator[bytes]:
    """The SSE body: the job's tokens as chunks, then its end, then ``[DONE]``.

    gunicorn closes this generator when the client goes away (a write fails,
    or the feed sees the hangup), so the ``finally`` always unfollows.
    """
    sent = False
    frames = 0  # added to sluice_frames_sent_total once, at the end
    try:
        with feed:
            feed.watch_hangup(client)
            opening = completion.opening()
            if opening:
                yield opening
            for frame in feed.frames(KEEPALIVE_S):
                if frame is None:
                    yield b": keep-alive\n\n"
                    continue
                kind = frame_kind(frame)
                if kind == "token":
                    yield completion.content(token_json(frame))
                    frames += 1
                    if not sent:
                        sent = True
                        _record_ttft(jobs, feed.job_id, accepted)
                elif kind == "restart" and sent:
                    # OpenAI's chunks cannot take text back: end rather than splice.
                    yield completion.error("job_restarted", f"job {feed.job_id} is being "
                                           "re-run (its worker died, or its provider failed "
                                           "mid-stream), so the text streamed so far is void; "
                                           "retry, or resume the job over the WebSocket")
                    return
                elif kind == "done":
                    yield from completion.ending(json.loads(frame))
                    yield DONE
                    metrics.observe_done(frame)
                elif kind == "error":
                    event = json.loads(frame)
                    yield completion.error(event["code"], event["message"])
    except ClientGoneError:
        return
    except redis.RedisError:
        yield completion.error("unavailable", "the gateway lost Redis while streaming; "
                               f"resume job {feed.job_id} over the WebSocket")
    finally:
        metrics.FRAMES_SENT.inc(frames)
        feed.close()
        if not feed.ended:
            gone()


def _wait(feed: JobFeed, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Wait for the job's end; return its text (after its last restart) and ``done`` event.

    :raises ApiError: the job ended with an error.
    """
    pieces: list[str] = []
    for frame in feed.frames():
        assert frame is not None
        kind = frame_kind(frame)
        if kind == "token":
            pieces.append(json.loads(token_json(frame)))
        elif kind == "restart":
            pieces.clear()
        elif kind == "done":
            metrics.observe_done(frame)
            return "".join(pieces), json.loads(frame)
        elif kind == "error":
            event = json.loads(frame)
            code = event["code"]
            raise ApiError(JOB_STATUS.get(code, 502), code, event["message"],
                           headers={**headers, "x-should-retry": "false"}
                           if code == "cancelled" else headers, refused=False)
    raise AssertionError("the feed ended without a done or error event")


def _record_ttft(jobs: JobStore, job_id: str, accepted: float) -> None:
    ttft_s = time.monotonic() - accepted
    metrics.CLIENT_TTFT.observe(ttft_s)
    try:
        jobs.record_client_ttft(job_id, ttft_s * 1000)
    except redis.RedisError as e:
        log.warning("could not record the TTFT of job %s: %s", job_id, e)


def _cancel(jobs: JobStore, job_id: str) -> None:
    try:
        jobs.request_cancel(job_id)
    except redis.RedisError as e:
        log.warning("could not cancel job %s of a closed request: %s", job_id, e)

