"""A batch's output and error files: one JSONL line per request, in OpenAI's output shape.

Every request of the input ends in exactly one of the two files, matched by
its ``custom_id``::

    {"id": "batch_req_<job id>", "custom_id": "…",
     "response": {"status_code": 200, "request_id": "<job id>", "body": <chat.completion>},
     "error": null}

A request whose job failed has its error body (``{"error": {…}}``) and the
HTTP status the chat completions endpoint would have answered; one that never
ran (a bad line, cancelled or expired while held) has ``response: null`` and
an ``error`` with a code and a message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import gevent

from app.batch_input import LineError
from tasks.bulk import BulkEngine
from tasks.bulk_store import BulkRecord, item_job_id
from tasks.outcome import Outcome

#: HTTP status of a request whose job failed, by error code (else 502 for provider
#: errors, 500 for the rest).
STATUS = {"too_large": 400, "bad_field": 400, "out_of_range": 400, "unknown_model": 404,
          "model_not_allowed": 403, "rate_limited": 429, "timeout": 504, "unavailable": 503}
#: Items rendered per round trip.
CHUNK = 500


def chat_completion(outcome: Outcome) -> dict[str, Any]:
    """The ``chat.completion`` object of a done item."""
    return {"id": f"chatcmpl-{outcome.job_id}", "object": "chat.completion",
            "created": outcome.created_s, "model": outcome.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": outcome.finish_reason or "stop"}],
            "usage": {"prompt_tokens": outcome.prompt_tokens,
                      "completion_tokens": outcome.completion_tokens,
                      "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}}


def _line(job_id: str, custom_id: Any, response: dict[str, Any] | None,
          error: dict[str, Any] | None) -> bytes:
    return json.dumps({"id": f"batch_req_{job_id}", "custom_id": custom_id,
                       "response": response, "error": error},
                      separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _item_line(rec: BulkRecord, index: int, custom_id: Any, outcome: Outcome | None
               ) -> tuple[bool, bytes]:
    """(whether it goes to the output file, the line)."""
    job_id = item_job_id(rec.bulk_id, index)
    if outcome is not None and outcome.status == "done":
        return True, _line(job_id, custom_id, {"status_code": 200, "request_id": job_id,
                                               "body": chat_completion(outcome)}, None)
    if outcome is None or outcome.status == "cancelled" or not outcome.job_id:
        code, message = _never_ran(rec, outcome)
        return False, _line(job_id, custom_id, None, {"code": code, "message": message})
    code = outcome.code or "error"
    status = STATUS.get(code, 502 if code.startswith("provider") else 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return False, _line(job_id, custom_id, {
        "status_code": status, "request_id": job_id,
        "body": {"error": {"message": outcome.message, "type": kind, "param": None,
                           "code": code}}}, None)


def _never_ran(rec: BulkRecord, outcome: Outcome | None) -> tuple[str, str]:
    if outcome is not None and outcome.status == "failed":
        return outcome.code or "error", outcome.message or "the request failed"
    if outcome is not None:
        return "batch_cancelled", "the batch was cancelled while this request ran"
    if rec.status == "expired":
        return "batch_expired", "the batch expired before this request started"
    return "batch_cancelled", "the batch was cancelled before this request started"


def render(engine: BulkEngine, rec: BulkRecord, line_errors: list[LineError]
           ) -> tuple[bytes, bytes]:
    """The output file and the error file of an ended batch."""
    out: list[bytes] = []
    err = [_line(f"line{e.line}", e.custom_id, None, {"code": e.code, "message": e.message})
           for e in line_errors]
    for lines in _chunks(engine, rec):
        for to_output, line in lines:
            (out if to_output else err).append(line)
    return b"".join(out), b"".join(err)


def _chunks(engine: BulkEngine, rec: BulkRecord) -> Iterator[list[tuple[bool, bytes]]]:
    for start in range(0, rec.total, CHUNK):
        gevent.sleep(0)  # a 50,000-line batch must not stall the process's sockets
        yield [_item_line(rec, index, ref, outcome)
               for index, ref, outcome in engine.outcomes(rec.bulk_id, start, CHUNK)]
