"""A Batch API input file: JSONL lines of chat-completion requests, validated one by one.

Each line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}``; the body is validated exactly as a socket's ``generate``
frame is (:func:`app.protocol.parse`), after OpenAI's spellings are mapped
(``max_completion_tokens``, content given as a list of text parts).  A bad
line is reported by its number and never sinks the others; a file that is not
JSONL at all, too large, or with a ``custom_id`` used twice fails as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gevent

from app.openai_request import join_text_parts
from app.protocol import Generate, ProtocolError, parse
from tasks.bulk import Held
from tasks.config import Settings

MAX_CUSTOM_ID_CHARS = 512
#: Body fields Sluice cannot honour, with the values each may take (besides null).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {"n": (1,), "stream": (False,), "logprobs": (False,)}
#: Lines validated between two yields to the other greenlets of the process.
YIELD_EVERY = 200


class InputFileError(ValueError):
    """The whole file is refused; ``code`` is stable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LineError:
    """Why one line of the file is not a request (OpenAI's ``BatchError``)."""

    line: int
    code: str
    message: str
    custom_id: str | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The entry of the batch's ``errors.data``."""
        return {"code": self.code, "message": self.message, "param": self.param,
                "line": self.line}


@dataclass(frozen=True)
class BatchInput:
    """The requests of a file, in file order, and its bad lines."""

    #: One per valid line; ``ref`` is the line's ``custom_id``.
    items: list[Held]
    #: The line number of each item.
    lines: list[int]
    errors: list[LineError]

    @property
    def total(self) -> int:
        """Requests in the file, bad ones included."""
        return len(self.items) + len(self.errors)


def parse_input(content: bytes, endpoint: str, settings: Settings) -> BatchInput:
    """Validate a batch input file.

    :param endpoint: the batch's endpoint; every line's ``url`` must name it.
    :raises InputFileError: ``file_too_large``, ``invalid_file`` (not UTF-8, or no line is
        a JSON object), ``empty_file``, ``too_many_items``, ``duplicate_custom_id``.
    """
    if len(content) > settings.batch_max_file_bytes:
        raise InputFileError("file_too_large", f"the file has {len(content)} bytes; at most "
                             f"{settings.batch_max_file_bytes} are accepted")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError("invalid_file", f"the file is not UTF-8 text: {e}") from e
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputFileError("empty_file", "the file has no requests")
    if len(lines) > settings.batch_max_items:
        raise InputFileError("too_many_items", f"the file has {len(lines)} requests; at most "
                             f"{settings.batch_max_items} are accepted in one batch")
    items: list[Held] = []
    numbers: list[int] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    objects = 0
    for i, (number, line) in enumerate(lines):
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            gevent.sleep(0)
        try:
            request = json.loads(line)
        except ValueError as e:
            errors.append(LineError(number, "invalid_json", f"line {number} is not JSON: {e}"))
            continue
        if not isinstance(request, dict):
            errors.append(LineError(number, "invalid_request",
                                    f"line {number} must be a JSON object"))
            continue
        objects += 1
        custom_id = request.get("custom_id")
        if isinstance(custom_id, str) and custom_id:
            if custom_id in seen:
                raise InputFileError("duplicate_custom_id", f"custom_id {custom_id!r:.80} is "
                                     f"used on lines {seen[custom_id]} and {number}; each "
                                     "request needs its own")
            seen[custom_id] = number
        try:
            items.append(_request(request, endpoint, settings))
            numbers.append(number)
        except _LineRefusedError as e:
            errors.append(LineError(number, e.code, f"line {number}: {e.message}",
                                    custom_id if isinstance(custom_id, str) else None, e.param))
    if objects == 0:
        raise InputFileError("invalid_file", "the file is not JSONL: no line is a JSON object")
    return BatchInput(items, numbers, errors)


class _LineRefusedError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _request(request: dict[str, Any], endpoint: str, settings: Settings) -> Held:
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineRefusedError("missing_custom_id", "'custom_id' must be a non-empty string",
                                "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _LineRefusedError("invalid_custom_id", f"'custom_id' is longer than "
                                f"{MAX_CUSTOM_ID_CHARS} characters", "custom_id")
    if request.get("method") != "POST":
        raise _LineRefusedError("invalid_method", f"'method' must be \"POST\", not "
                                f"{request.get('method')!r:.40}", "method")
    if request.get("url") != endpoint:
        raise _LineRefusedError("invalid_url", f"'url' must be the batch's endpoint "
                                f"{endpoint!r}, not {request.get('url')!r:.80}", "url")
    body = request.get("body")
    if not isinstance(body, dict):
        raise _LineRefusedError("invalid_body", "'body' must be a JSON object", "body")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise _LineRefusedError("unsupported", f"{name!r} is not supported in a batch "
                                    f"(only {json.dumps(allowed[0])})", f"body.{name}")
    frame: dict[str, Any] = {"type": "generate", "messages": _messages(body.get("messages"))}
    for name in ("model", "temperature", "seed"):
        if body.get(name) is not None:
            frame[name] = body[name]
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None:
        frame["max_tokens"] = max_tokens
    try:
        generate = parse(json.dumps(frame), settings)
    except ProtocolError as e:
        raise _LineRefusedError(e.code, e.message) from e
    assert isinstance(generate, Generate)
    return Held(generate.spec, generate.max_tokens_given, ref=custom_id)


def _messages(messages: Any) -> Any:
    if messages is None:
        raise _LineRefusedError("missing_field", "'body.messages' is required", "body.messages")
    return join_text_parts(messages)
