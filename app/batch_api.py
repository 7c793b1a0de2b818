"""The Batch API over HTTP, shaped like OpenAI's, so the official ``openai`` SDK works unmodified.

``POST /v1/files`` (multipart ``file``, ``purpose=batch``), ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``; ``POST /v1/batches``,
``GET /v1/batches/{id}``, ``GET /v1/batches`` (``limit``, ``after``),
``POST /v1/batches/{id}/cancel``.  Every request needs ``Authorization: Bearer``;
files and batches belong to the key that made them, and any other key gets
404.  Errors are OpenAI's ``{"error": {message, type, param, code}}``.

A batch is a bulk (:mod:`tasks.bulk`) whose items are its valid lines: they
are held and started by the pump within the key's limits and batch share,
and each becomes an ordinary job on the bulk queue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import redis
from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app import metrics
from app.apikeys import KeyInfo, bearer_token
from app.batch_input import InputFileError, LineError, parse_input
from app.batch_output import render
from app.batches import BATCH_ID, WINDOWS_S, BatchRecord, BatchStore, batch_object
from app.files import RESULT_ID, UPLOAD_ID, FileRecord, FileStore, result_file_id
from app.frontend import FrontEnd
from tasks.bulk import BulkEngine, BulkRejectedError, BulkStatus, UnknownBulkError
from tasks.bulk_store import new_bulk_id

log = logging.getLogger(__name__)
bp = Blueprint("batch_api", __name__)

ENDPOINTS = ("/v1/chat/completions",)
MAX_METADATA = 16
MAX_LIST = 100
#: How long a request for a batch's results waits while another renders them.
RENDER_WAIT_S = 30.0
#: OpenAI's error ``type`` by HTTP status (else invalid_request_error, or server_error for 5xx).
TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "invalid_request_error", 429: "rate_limit_error"}


class BatchApiError(Exception):
    """A request answered with an error in OpenAI's shape."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def body(self) -> dict[str, Any]:
        """OpenAI's ``{"error": {message, type, param, code}}``."""
        kind = TYPES.get(self.status, "server_error" if self.status >= 500
                         else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


@bp.errorhandler(BatchApiError)
def _render_error(e: BatchApiError) -> ResponseReturnValue:
    metrics.REQUESTS_REJECTED.labels(e.code).inc()
    return jsonify(e.body()), e.status


@bp.errorhandler(redis.RedisError)
def _redis_down(e: redis.RedisError) -> ResponseReturnValue:
    log.warning("batch API: Redis unavailable: %s", e)
    return _render_error(BatchApiError(503, "unavailable", "the gateway cannot reach Redis; "
                                       "retry shortly"))


class Parts:
    """What the Batch API's views need of the front end, built once per app."""

    def __init__(self, front: FrontEnd, engine: BulkEngine) -> None:
        settings = front.settings
        self.front = front
        self.engine = engine
        self.files = FileStore(front.redis, settings.batch_retention_s)
        self.batches = BatchStore(front.redis, settings.bulk_max_wait_s
                                  + settings.batch_retention_s)


def _parts() -> Parts:
    parts: Parts | None = current_app.extensions.get("sluice_batch_api")
    if parts is None:
        parts = Parts(current_app.extensions["sluice"], current_app.extensions["sluice_bulk"])
        current_app.extensions["sluice_batch_api"] = parts
    return parts


def _key(parts: Parts) -> KeyInfo:
    token = bearer_token(request.headers.get("Authorization", ""))
    key = parts.front.auth.authenticate(token)
    if key is None:
        raise BatchApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer "
                            "<key>'" if token is None else "invalid or revoked API key")
    return key


# -- files -----------------------------------------------------------------
@bp.post("/v1/files")
def create_file() -> ResponseReturnValue:
    """Upload a batch input file (multipart: ``file``, ``purpose=batch``)."""
    parts = _parts()
    key = _key(parts)
    limit = parts.front.settings.batch_max_file_bytes
    if request.content_length is not None and request.content_length > limit + 65536:
        raise BatchApiError(413, "file_too_large", f"files may have at most {limit} bytes")
    purpose = request.form.get("purpose")
    upload = request.files.get("file")
    if upload is None:
        raise BatchApiError(400, "missing_field", "send the file as the multipart field "
                            "'file'", "file")
    if purpose != "batch":
        raise BatchApiError(400, "bad_field", f"purpose {purpose!r:.40} is not supported; "
                            "this gateway takes files for 'batch' only", "purpose")
    content = upload.stream.read(limit + 1)
    if len(content) > limit:
        raise BatchApiError(413, "file_too_large", f"files may have at most {limit} bytes")
    rec = parts.files.create(key.key_id, purpose, upload.filename or "input.jsonl", content)
    return jsonify(rec.as_openai())


@bp.get("/v1/files/<file_id>")
def get_file(file_id: str) -> ResponseReturnValue:
    """A file's record."""
    parts = _parts()
    return jsonify(_file(parts, _key(parts), file_id).as_openai())


@bp.get("/v1/files/<file_id>/content")
def file_content(file_id: str) -> ResponseReturnValue:
    """A file's bytes (a batch's results as JSONL)."""
    parts = _parts()
    rec = _file(parts, _key(parts), file_id)
    content = parts.files.content(rec.file_id)
    if content is None:
        raise BatchApiError(404, "not_found", f"no file {file_id!r}")
    return Response(content, mimetype="application/jsonl")


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id: str) -> ResponseReturnValue:
    """Delete a file."""
    parts = _parts()
    rec = _file(parts, _key(parts), file_id)
    parts.files.delete(rec.file_id)
    return jsonify(id=rec.file_id, object="file", deleted=True)


def _file(parts: Parts, key: KeyInfo, file_id: str) -> FileRecord:
    """The key's file; a batch's results are rendered the first time they are asked for."""
    missing = BatchApiError(404, "not_found", f"no file {file_id!r:.80}")
    rec = parts.files.get(file_id, key.key_id) if (UPLOAD_ID.match(file_id)
                                                   or RESULT_ID.match(file_id)) else None
    if rec is not None:
        return rec
    m = RESULT_ID.match(file_id)
    if m is None:
        raise missing
    bulk_id = m["bulk"]
    batch = parts.batches.get(bulk_id, key.key_id)
    status = _bulk_status(parts, key, bulk_id) if batch is not None else None
    if batch is None or status is None or not status.record.finished or batch.rendered:
        raise missing
    if parts.batches.claim_render(bulk_id):
        _render_files(parts, batch, status)
    else:  # another request renders them: wait for it
        deadline = time.monotonic() + RENDER_WAIT_S
        while not getattr(parts.batches.get(bulk_id, key.key_id), "rendered", True) \
                and time.monotonic() < deadline:
            gevent.sleep(0.1)
    rec = parts.files.get(file_id, key.key_id)
    if rec is None:
        raise missing
    return rec


def _render_files(parts: Parts, batch: BatchRecord, status: BulkStatus) -> None:
    """Write an ended batch's output and error files, then drop its kept results."""
    output, errors = render(parts.engine, status.record, batch.errors)
    for which, content in (("output", output), ("errors", errors)):
        if content:
            parts.files.create(batch.owner, "batch_output", f"batch_{batch.bulk_id}_{which}"
                               ".jsonl", content, result_file_id(batch.bulk_id, which))
    parts.batches.mark_rendered(batch.bulk_id, parts.files.ttl_s)
    parts.engine.store.drop_results(batch.bulk_id)


# -- batches ---------------------------------------------------------------
@bp.post("/v1/batches")
def create_batch() -> ResponseReturnValue:
    """Create a batch from an uploaded file; its valid lines start as the key's limits allow."""
    parts = _parts()
    key = _key(parts)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BatchApiError(400, "bad_json", "the body must be a JSON object")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise BatchApiError(400, "bad_field", f"endpoint {endpoint!r:.80} is not supported; "
                            f"use {', '.join(ENDPOINTS)}", "endpoint")
    window = body.get("completion_window")
    if window not in WINDOWS_S:
        raise BatchApiError(400, "bad_field", f"completion_window {window!r:.20} is not "
                            f"supported; use {', '.join(WINDOWS_S)}", "completion_window")
    metadata = _metadata(body.get("metadata"))
    file_id = body.get("input_file_id")
    upload = parts.files.get(file_id, key.key_id) if isinstance(file_id, str) \
        and UPLOAD_ID.match(file_id) else None
    if upload is None:
        raise BatchApiError(404, "not_found", f"no file {file_id!r:.80}", "input_file_id")
    content = parts.files.content(upload.file_id) or b""
    bulk_id = new_bulk_id()
    rec = BatchRecord(bulk_id, key.key_id, endpoint, upload.file_id, window,
                      parts.engine.now_s(), metadata)
    try:
        parsed = parse_input(content, endpoint, parts.front.settings)
    except InputFileError as e:
        rec.errors = [LineError(0, e.code, e.message)]
        rec.failed_at = rec.created_at
        parts.batches.put(rec)
        return jsonify(batch_object(rec, None))
    rec.errors = parsed.errors
    # The record first: a batch whose bulk runs is never invisible to its owner.
    parts.batches.put(rec)
    try:
        submission = parts.engine.submit(key, parsed.items, kind="batch", announce=False,
                                         keep=True, max_items=parts.front.settings
                                         .batch_max_items, bulk_id=bulk_id)
    except BaseException as e:
        parts.batches.forget(key.key_id, bulk_id)
        if isinstance(e, BulkRejectedError):
            raise BatchApiError(429, e.code, e.message) from e
        raise
    # Lines the key's tier refuses (model, max_tokens) are reported like bad lines.
    refused = [LineError(line, job.code, f"line {line}: {job.message}", item.ref)
               for line, item, job in zip(parsed.lines, parsed.items, submission.jobs,
                                          strict=True) if not isinstance(job, str)]
    if refused:
        rec.errors = sorted(parsed.errors + refused, key=lambda e: e.line)
        parts.batches.set_errors(bulk_id, rec.errors)
    return jsonify(batch_object(rec, _bulk_status(parts, key, bulk_id)))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and len(value) <= MAX_METADATA
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in value.items())):
        raise BatchApiError(400, "bad_field", f"metadata must be an object of at most "
                            f"{MAX_METADATA} string values (keys up to 64 characters, values "
                            "up to 512)", "metadata")
    return value


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str) -> ResponseReturnValue:
    """A batch: its status, counts and files, and its held items' place and ETA."""
    parts = _parts()
    key = _key(parts)
    rec = _batch(parts, key, batch_id)
    return jsonify(batch_object(rec, _bulk_status(parts, key, rec.bulk_id)))


@bp.get("/v1/batches")
def list_batches() -> ResponseReturnValue:
    """The key's batches, newest first (``limit`` 1..100, default 20; ``after`` a batch id)."""
    parts = _parts()
    key = _key(parts)
    limit_arg = request.args.get("limit", "20")
    if not limit_arg.isdigit() or not 1 <= int(limit_arg) <= MAX_LIST:
        raise BatchApiError(400, "bad_field", f"limit must be within 1..{MAX_LIST}", "limit")
    after = request.args.get("after")
    after_m = BATCH_ID.match(after) if after else None
    if after and not after_m:
        raise BatchApiError(400, "bad_field", f"after {after!r:.80} is not a batch id", "after")
    ids, more = parts.batches.list(key.key_id, after_m["bulk"] if after_m else None,
                                   int(limit_arg))
    data = []
    for bulk_id in ids:
        rec = parts.batches.get(bulk_id, key.key_id)
        if rec is None:
            parts.batches.forget(key.key_id, bulk_id)  # it expired
        else:
            data.append(batch_object(rec, _bulk_status(parts, key, bulk_id)))
    return jsonify(object="list", data=data, first_id=data[0]["id"] if data else None,
                   last_id=data[-1]["id"] if data else None, has_more=more)


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> ResponseReturnValue:
    """Cancel a batch: held requests never start, running ones stop; results so far are kept."""
    parts = _parts()
    key = _key(parts)
    rec = _batch(parts, key, batch_id)
    if rec.failed_at is not None:
        raise BatchApiError(409, "invalid_state", f"batch {batch_id} failed; nothing to cancel")
    bulk = parts.engine.store.get(rec.bulk_id)
    if bulk is not None and bulk.status in ("completed", "expired"):
        raise BatchApiError(409, "invalid_state", f"batch {batch_id} has {bulk.status}; "
                            "nothing to cancel")
    try:
        parts.engine.cancel(key.key_id, rec.bulk_id)
    except UnknownBulkError as e:
        raise BatchApiError(404, "not_found", f"no batch {batch_id!r:.80}") from e
    return jsonify(batch_object(rec, _bulk_status(parts, key, rec.bulk_id)))


def _batch(parts: Parts, key: KeyInfo, batch_id: str) -> BatchRecord:
    m = BATCH_ID.match(batch_id)
    rec = parts.batches.get(m["bulk"], key.key_id) if m else None
    if rec is None:
        raise BatchApiError(404, "not_found", f"no batch {batch_id!r:.80}")
    return rec


def _bulk_status(parts: Parts, key: KeyInfo, bulk_id: str) -> BulkStatus | None:
    try:
        return parts.engine.status(key.key_id, bulk_id)
    except UnknownBulkError:
        return None
