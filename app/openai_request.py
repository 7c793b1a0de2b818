"""An OpenAI-style completion request, validated into a ``Generate`` as a socket's would be.

The fields the two transports share (model, messages or prompt, max_tokens,
temperature, seed) are validated by :func:`app.protocol.generate_request`, so
a request is refused alike over HTTP and over the WebSocket; this module only
maps OpenAI's spelling onto them and refuses what Sluice cannot honour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flask import Request

from app.completion import error_body
from app.protocol import Generate, ProtocolError, generate_request
from tasks.config import Settings

#: HTTP status of a request refused with a protocol error code (else 400).
STATUS = {"unknown_model": 404, "too_large": 413, "unavailable": 503}
#: OpenAI's error ``type`` by HTTP status (else invalid_request_error, or server_error for 5xx).
TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
#: Request fields Sluice cannot honour, with the values each may take (besides null).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,)}


class ApiError(Exception):
    """A request answered with an error in OpenAI's shape; ``code`` is Sluice's stable code."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, *, refused: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        #: The request was refused (counted as such), rather than its job failing.
        self.refused = refused

    def body(self) -> dict[str, Any]:
        """OpenAI's ``{"error": {message, type, param, code}}``."""
        kind = TYPES.get(self.status, "server_error" if self.status >= 500
                         else "invalid_request_error")
        return error_body(self.code, self.message, kind, self.param)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated chat or text completion request."""

    generate: Generate
    stream: bool
    #: Send a usage chunk before ``[DONE]`` (``stream_options.include_usage``).
    include_usage: bool


def parse(request: Request, settings: Settings, *, chat: bool) -> CompletionRequest:
    """Read and validate the body of a ``/v1/chat/completions`` or ``/v1/completions`` request.

    The body may be no larger than ``settings.max_frame_bytes``, the limit of
    a WebSocket frame.  ``max_completion_tokens`` (chat) wins over
    ``max_tokens``; text content parts are joined; sampling fields other than
    ``temperature`` and ``seed`` are accepted and not passed on.

    :raises ApiError: the body is too large, not JSON, or a field is missing or bad.
    """
    body = _body(request, settings.max_frame_bytes)
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise ApiError(400, "unsupported", f"{name!r} is not supported by this gateway "
                           f"(only {json.dumps(allowed[0])})", name)
    stream, options = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise ApiError(400, "bad_field", "'stream' must be a boolean", "stream")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                       bool):
        raise ApiError(400, "bad_field", "'stream_options' must be an object with a boolean "
                       "'include_usage'", "stream_options")
    fields = {k: body[k] for k in ("model", "temperature", "seed") if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if chat:
        fields["messages"] = _messages(body.get("messages"))
    else:
        fields["prompt"] = _prompt(body.get("prompt"))
    try:
        generate = generate_request(fields, settings)
    except ProtocolError as e:
        raise ApiError(STATUS.get(e.code, 400), e.code, e.message,
                       "model" if e.code == "unknown_model" else None) from e
    return CompletionRequest(generate, stream, bool(stream and options.get("include_usage")))


def _body(request: Request, limit: int) -> dict[str, Any]:
    too_large = ApiError(413, "too_large", f"the request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise too_large
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _messages(messages: Any) -> Any:
    if messages is None:
        raise ApiError(400, "missing_field", "'messages' is required", "messages")
    return join_text_parts(messages)


def join_text_parts(messages: Any) -> Any:
    """Chat messages with lists of text parts joined into strings (anything else as given)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str)
                                             for p in content):
            m = {**m, "content": "".join(p["text"] for p in content)}
        out.append(m)
    return out


def _prompt(prompt: Any) -> Any:
    """A legacy prompt: a string, or a list holding one string."""
    if prompt is None:
        raise ApiError(400, "missing_field", "'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "bad_field", "'prompt' must be a string (token arrays and batches "
                       "are not supported)", "prompt")
    return prompt
