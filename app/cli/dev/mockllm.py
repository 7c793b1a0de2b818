"""A cheap, deterministic OpenAI-compatible chat model server for tests and benchmarks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from tasks import tokens

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from tiktoken import Encoding

#: Words that each encode to exactly one cl100k token, leading space included.
VOCAB: tuple[str, ...] = tuple(" " + w for w in (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
    "by", "at", "this", "are", "from", "or", "an", "have", "not", "but", "they", "which", "you",
    "one", "all", "were", "we", "there", "can", "has", "more", "their", "if", "will", "its",
    "about", "so", "would", "what", "up", "out", "into", "than", "them", "only", "other", "new",
    "some", "could", "time", "these", "two", "may", "first", "then", "do", "any", "like", "my",
    "now", "over", "such", "our", "man", "me", "even", "most", "made", "after", "also", "did",
    "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well",
    "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state",
    "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here",
    "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while",
    "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came",
    "right", "used", "take", "three"
))
_VOCAB_JSON = tuple(json.dumps(w).encode() for w in VOCAB)
_INDICES = range(len(VOCAB))
_STAT_KEYS = ("requests", "streams_started", "streams_completed", "streams_aborted",
              "active_streams", "failures_injected", "connections")
Body = Iterator[bytes] | list[bytes]
Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class MockConfig:
    """How the mock model behaves; delays are in milliseconds."""

    ttft_ms: float = 200.0
    itl_ms: float = 100.0
    #: Uniform +/- jitter applied to every delay.
    jitter_ms: float = 0.0
    #: Natural completion length; a request gets ``min(max_tokens, output_tokens)`` tokens.
    output_tokens: int = 50
    fail_rate: float = 0.0
    #: ``"429"``/``"500"``: HTTP error before any token; ``"cut"``: connection dropped mid-stream.
    fail_mode: str = "500"
    models: tuple[str, ...] = ("mock-1",)
    #: ``Retry-After`` (seconds) sent with an injected 429; 0 sends none.
    retry_after_s: float = 0.0
    #: ``"cut"`` drops the connection after this many tokens; 0 cuts halfway.
    cut_after: int = 0
    #: When > 0, answers carry ``x-ratelimit-*-tokens`` headers counting this many
    #: tokens per minute (a fixed window; the mock never refuses for it).
    ratelimit_tpm: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        delays = (self.ttft_ms, self.itl_ms, self.jitter_ms)
        if (self.fail_mode not in ("429", "500", "cut") or not 0.0 <= self.fail_rate <= 1.0
                or self.output_tokens < 1 or not self.models or min(delays) < 0
                or self.retry_after_s < 0 or self.cut_after < 0 or self.ratelimit_tpm < 0):
            raise ValueError(f"invalid MockConfig: {self!r}")


class _ApiError(Exception):
    """A request the mock refuses, rendered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def get_encoding() -> Encoding:
    """Return the cl100k encoding, loading it on first use (about 0.3 s).

    :return: the shared tiktoken encoding (see :mod:`tasks.tokens`).
    """
    return tokens.encoding_for_model(None)


def count_prompt_tokens(messages: Messages) -> int:
    """Count prompt tokens the way OpenAI bills chat messages.

    :param messages: chat messages (``role``, ``content``, optional ``name``).
    :return: tiktoken count of every string field, plus 3 per message, 1 per name and 3 for priming.
    """
    return tokens.count_message_tokens(messages)


def _token_indices(prompt_or_messages: str | Messages, seed: int | None, n: int) -> list[int]:
    prompt = prompt_or_messages
    if not isinstance(prompt, str):
        prompt = "".join(tokens.content_text(m.get("content")) for m in prompt)
    digest = hashlib.sha256(f"{seed or 0}\x00{prompt}".encode("utf-8", "surrogatepass")).digest()
    # Each draw is independent of n, so a shorter completion is a prefix of a longer one.
    return random.Random(digest).choices(_INDICES, k=n)


def _length(max_tokens: int | None, config: MockConfig) -> tuple[int, str]:
    if max_tokens is not None and max_tokens < config.output_tokens:
        return max_tokens, "length"
    return config.output_tokens, "stop"


def expected_text(prompt_or_messages: str | Messages, max_tokens: int | None,
                  config: MockConfig, seed: int | None = None) -> str:
    """Return the exact completion the mock produces for a request.

    :param prompt_or_messages: the chat messages, or the concatenation of their contents.
    :param max_tokens: the request's ``max_tokens``; ``None`` for the configured length.
    :param config: the server's configuration.
    :param seed: the request's ``seed``; ``None`` behaves like 0.
    :return: the completion text (every word is one token with a leading space).
    """
    n, _ = _length(max_tokens, config)
    return "".join(VOCAB[i] for i in _token_indices(prompt_or_messages, seed, n))


def _parse_request(body: Any, config: MockConfig) -> tuple[str, Messages, int | None, int | None]:
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.", "invalid_json")
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise _ApiError(400, "'messages' must be a non-empty array of objects.", "invalid_value",
                        "messages")
    model = body.get("model")
    if not isinstance(model, str):
        raise _ApiError(400, "You must provide a model parameter.", "missing_required_parameter",
                        "model")
    if model not in config.models:
        raise _ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       "model_not_found", "model")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens, seed = body.get(key), body.get("seed")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise _ApiError(400, f"'{key}' must be an integer >= 1.", "invalid_value", key)
    if seed is not None and type(seed) is not int:
        raise _ApiError(400, "'seed' must be an integer.", "invalid_value", "seed")
    return model, messages, max_tokens, seed


class MockApp:
    """The WSGI callable of the mock; ``stats`` holds its counters."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self._rng = random.Random()  # failure draws and jitter: need not be reproducible
        self._minute, self._minute_tokens = 0, 0  # the x-ratelimit window
        listed = [{"id": m, "object": "model", "created": 0, "owned_by": "sluice-mock"}
                  for m in config.models]
        self._models = json.dumps({"object": "list", "data": listed})

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Body:
        route = environ["REQUEST_METHOD"] + " " + environ.get("PATH_INFO", "")
        try:
            if route == "POST /v1/chat/completions":
                return self._chat(environ, start_response)
            if route == "GET /v1/models":
                return _send(start_response, 200, self._models)
            if route == "GET /mock/stats":
                return _send(start_response, 200, json.dumps(self.stats))
            raise _ApiError(404, f"Unknown request URL: {route}.", "unknown_url")
        except _ApiError as e:
            error = {"message": e.message, "type": "invalid_request_error", "param": e.param,
                     "code": e.code}
            return _send(start_response, e.status, json.dumps({"error": error}))

    def _chat(self, environ: WSGIEnvironment, start_response: StartResponse) -> Body:
        t0 = time.monotonic()
        self.stats["requests"] += 1
        try:
            body = json.loads(environ["wsgi.input"].read() or b"null")
        except ValueError:
            raise _ApiError(400, "We could not parse the JSON body of your request.",
                            "invalid_json") from None
        model, messages, max_tokens, seed = _parse_request(body, self.config)
        cfg = self.config
        cut = False
        if cfg.fail_rate and self._rng.random() < cfg.fail_rate:
            self.stats["failures_injected"] += 1
            if cfg.fail_mode == "429":
                wait = [("Retry-After", f"{cfg.retry_after_s:g}")] if cfg.retry_after_s else []
                return _send(start_response, 429, _RATE_LIMITED, wait)
            if cfg.fail_mode == "500":
                return _send(start_response, 500, _SERVER_ERROR)
            cut = True
        n, finish = _length(max_tokens, cfg)
        indices = _token_indices(messages, seed, n)
        cid, created = "chatcmpl-" + os.urandom(12).hex(), int(time.time())
        if not body.get("stream"):
            duration = (cfg.ttft_ms + cfg.itl_ms * (n - 1)) / 1000
            gevent.sleep(max(0.0, t0 + duration - time.monotonic()))
            if cut:
                _drop_connection()
            usage = _usage(messages, n)
            return _send(start_response, 200, json.dumps({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(
                    VOCAB[i] for i in indices)}, "logprobs": None, "finish_reason": finish}],
                "usage": usage}))
        options = body.get("stream_options")
        usage_wanted = isinstance(options, dict) and bool(options.get("include_usage"))
        head = (f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
                f'"model":{json.dumps(model)},"choices":').encode()
        tail = head + b'[{"index":0,"delta":{},"finish_reason":"' + finish.encode() + b'"}]}\n\n'
        if usage_wanted:
            usage_json = json.dumps(_usage(messages, n), separators=(",", ":")).encode()
            tail += head + b'[],"usage":' + usage_json + b"}\n\n"
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-cache"),
                                  *self._ratelimit(count_prompt_tokens(messages) + n)])
        indices = indices[:max(1, cfg.cut_after or n // 2)] if cut else indices
        return self._stream(t0, head, indices, tail + b"data: [DONE]\n\n", cut)

    def _ratelimit(self, tokens: int) -> list[tuple[str, str]]:
        """Count ``tokens`` in this minute; return the ``x-ratelimit-*-tokens`` headers."""
        tpm = self.config.ratelimit_tpm
        if not tpm:
            return []
        now = time.time()
        if int(now // 60) != self._minute:
            self._minute, self._minute_tokens = int(now // 60), 0
        self._minute_tokens += tokens
        reset_s = 60 - now % 60
        return [("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, tpm - self._minute_tokens))),
                ("x-ratelimit-reset-tokens", f"{reset_s:.3f}s")]

    def _stream(self, t0: float, head: bytes, indices: list[int], tail: bytes,
                cut: bool) -> Iterator[bytes]:
        stats, cfg, sleep, now, words = (self.stats, self.config, gevent.sleep, time.monotonic,
                                         _VOCAB_JSON)
        first = head + b'[{"index":0,"delta":{"role":"assistant","content":'
        prefix = head + b'[{"index":0,"delta":{"content":'
        suffix = b'},"finish_reason":null}]}\n\n'
        jitter, uniform = cfg.jitter_ms / 1000, self._rng.uniform
        delay, itl = cfg.ttft_ms / 1000, cfg.itl_ms / 1000
        # Deadlines are absolute so write time and scheduling lag do not add up into the ITL.
        deadline, lead = t0, first
        stats["streams_started"] += 1
        stats["active_streams"] += 1
        try:
            for i in indices:
                deadline += max(0.0, delay + uniform(-jitter, jitter)) if jitter else delay
                wait = deadline - now()
                sleep(max(0.0, wait))  # sleep(0) still yields: a fast stream cannot starve the rest
                yield lead + words[i] + suffix
                delay, lead = itl, prefix
            if cut:
                _drop_connection()
            yield tail
            stats["streams_completed"] += 1
        except GeneratorExit:  # pywsgi closes us when a write to the client fails
            stats["streams_aborted"] += 1
            raise
        finally:
            stats["active_streams"] -= 1


def _drop_connection() -> None:
    # pywsgi silently closes the socket on ECONNRESET and skips the chunked terminator,
    # which is exactly a connection lost mid-response.
    raise ConnectionResetError(errno.ECONNRESET, "mockllm: injected connection cut")


def _usage(messages: Messages, n: int) -> dict[str, int]:
    prompt = count_prompt_tokens(messages)
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


def _send(start_response: StartResponse, status: int, body: str,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = body.encode()
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                    *(headers or [])])
    return [data]


_RATE_LIMITED = json.dumps({"error": {
    "message": "Rate limit reached (injected by mockllm).", "type": "requests", "param": None,
    "code": "rate_limit_exceeded"}})
_SERVER_ERROR = json.dumps({"error": {
    "message": "The server had an error while processing your request (injected by mockllm).",
    "type": "server_error", "param": None, "code": None}})


def make_wsgi_app(config: MockConfig) -> MockApp:
    """Build the mock's WSGI application.

    :param config: how the model behaves.
    :return: the WSGI callable; its ``stats`` dict is what ``GET /mock/stats`` serves.
    """
    return MockApp(config)


class _Handler(WSGIHandler):  # type: ignore[misc]  # gevent ships no types
    def handle(self) -> None:
        # One handler per accepted connection: clients that keep theirs alive
        # show as fewer connections than requests.
        self.server.application.stats["connections"] += 1
        with contextlib.suppress(OSError):
            # Nagle plus the client's delayed ACK would hold small token writes back by up to 40 ms.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()


def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve the mock model until interrupted.

    Prints ``mockllm listening on http://HOST:PORT/v1`` once bound, so a parent
    process can read the real port when ``port`` is 0. Does not monkey-patch.

    :param config: how the model behaves.
    :param host: the address to bind.
    :param port: the port to bind; 0 picks a free one.
    """
    get_encoding()  # load now so the first request's TTFT does not include it
    # gevent's default backlog (128) drops SYNs when a benchmark opens ~1000 streams at once.
    server = WSGIServer((host, port), make_wsgi_app(config), backlog=4096, log=None,
                        handler_class=_Handler)
    server.start()
    shown = f"[{host}]" if ":" in host else host
    print(f"mockllm listening on http://{shown}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=1)
