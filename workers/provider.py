"""The model provider clients: any OpenAI-compatible endpoints, through the official SDK.

One :class:`Provider` per deployment of the providers config (its own SDK
clients, key, timeouts); :class:`Providers` holds them all and streams from
the one :mod:`tasks.routing` picked.  Errors are classified here, where the
HTTP status is known: a connect error, a timeout, a 5xx or a 429 may fail
over to another deployment (``ProviderError.failover``), with the provider's
``Retry-After``; other 4xx would fail the same anywhere.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent
import httpcore2
import httpx2
import openai

# The SDK's own SSE decoder: the class is public, its module is not re-exported.
from openai._streaming import SSEDecoder

from tasks.config import Settings, readable_now
from tasks.deployments import Deployment, default_providers
from tasks.deployments import Providers as ProvidersConfig
from tasks.runtime import Finish, ProviderError, Usage

#: SDK clients per process, each with its own connection pool.  httpcore checks
#: every idle connection of a pool whenever a request starts or ends, so a
#: single pool of hundreds of kept-alive connections costs O(pool) per request.
POOLS = 16
#: How long to wait for the end of the body after ``data: [DONE]``; a body read
#: to its end puts the connection back in the pool, one cut short closes it.
#: The wait happens after the job has ended (see :class:`Completion`), so it can
#: be generous: a busy process may not come back to a drain for a while, and a
#: drain cut short costs the next request a new connection.
DRAIN_S = 5.0


class Providers:
    """The clients of every configured deployment (a :class:`tasks.runtime.Providers`).

    Example::

        providers = Providers(load_providers(settings), settings.worker_concurrency)
        with providers.stream("vllm-a", "meta-llama/Meta-Llama-3-8B-Instruct", messages, 16) as s:
            for piece in s: ...
    """

    def __init__(self, config: ProvidersConfig, concurrency: int) -> None:
        tls = httpx2.create_ssl_context()
        self.clients = {name: Provider.for_deployment(d, concurrency, tls)
                        for name, d in config.deployments.items()}

    def stream(self, deployment: str, model: str, messages: list[dict[str, Any]],
               max_tokens: int, *, temperature: float | None = None, seed: int | None = None
               ) -> Completion:
        """Start a streaming completion on ``deployment`` (see :meth:`Provider.stream`)."""
        return self.clients[deployment].stream(model, messages, max_tokens,
                                               temperature=temperature, seed=seed)

    def warm(self) -> None:
        """Warm every deployment's clients, all at once (best effort)."""
        gevent.joinall([gevent.spawn(client.warm) for client in self.clients.values()])

    def close(self) -> None:
        """Close every deployment's connections."""
        for client in self.clients.values():
            client.close()


class Provider:
    """Streams chat completions from one OpenAI-compatible deployment.

    Implements :class:`tasks.runtime.Provider`.  Connections are kept alive
    between requests (each response is read to its end), spread over
    :data:`POOLS` SDK clients.

    Example::

        provider = Provider(Settings.from_env())
        with provider.stream("mock-1", [{"role": "user", "content": "hi"}], 16) as chunks:
            for piece in chunks: ...
    """

    def __init__(self, settings: Settings, deployment: Deployment | None = None,
                 tls: Any = None) -> None:
        dep = deployment or next(iter(default_providers(settings).deployments.values()))
        # Hundreds of concurrent streams per worker process: the SDK's default
        # pool (100 connections) would queue them.
        keep = max(8, -(-settings.worker_concurrency // POOLS))
        # One TLS context for all: each loads the CA bundle (~40 ms of CPU).
        tls = tls or httpx2.create_ssl_context()
        self.clients = [openai.OpenAI(
            base_url=dep.base_url, api_key=dep.api_key or "sk-none",
            max_retries=dep.max_retries,
            timeout=httpx2.Timeout(dep.timeout_s, connect=dep.connect_timeout_s),
            http_client=openai.DefaultHttpxClient(transport=Transport(tls, httpx2.Limits(
                max_connections=None, max_keepalive_connections=keep))))
            for _ in range(POOLS)]
        self._streams = [0] * POOLS  # open streams per client
        #: The deployment's name (a bounded label for metrics).
        self.name = dep.name

    @classmethod
    def for_deployment(cls, deployment: Deployment, concurrency: int, tls: Any) -> Provider:
        """The client of one configured deployment."""
        return cls(Settings(worker_concurrency=concurrency), deployment, tls)

    def stream(self, model: str, messages: list[dict[str, Any]], max_tokens: int, *,
               temperature: float | None = None, seed: int | None = None) -> Completion:
        """Start a streaming completion.

        :return: a context manager yielding text pieces then one :class:`Finish`.
        :raises ProviderError: the request failed before streaming began.
        """
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                                "stream": True, "stream_options": {"include_usage": True}}
        if temperature is not None:
            body["temperature"] = temperature
        if seed is not None:
            body["seed"] = seed
        # The least busy client, the first on a tie: at a low request rate
        # every request goes to the first pool, whose connection is then still
        # alive (httpx drops one idle for 5 s; round robin would let each idle
        # K times longer); under load the streams spread evenly.
        i = self._streams.index(min(self._streams))
        self._streams[i] += 1
        try:
            response = self._post(self.clients[i], body)
        except BaseException:
            self._closed(i)
            raise
        return Completion(response, lambda: self._closed(i))

    @staticmethod
    def _post(client: openai.OpenAI, body: dict[str, Any]) -> httpx2.Response:
        try:
            # The SDK's request path (retries, status errors) returning the raw
            # streamed response: chunks are decoded here, as plain dicts (the
            # SDK's typed chunks cost ~5x more CPU per token, see README), and
            # the body is read to its end, which the SDK's Stream does not do.
            return client.post("/chat/completions", body=body, cast_to=httpx2.Response,
                               stream=True)
        except openai.APIStatusError as e:
            status = e.status_code
            raise ProviderError(f"provider_{status}", _message(e),
                                failover=status == 429 or status >= 500,
                                retry_after_s=retry_after(e.response.headers)) from e
        except openai.APITimeoutError as e:
            raise ProviderError("provider_timeout", _message(e), failover=True) from e
        except openai.APIError as e:
            raise ProviderError("provider_unavailable", _message(e), failover=True) from e

    def warm(self) -> None:
        """Make one cheap request per client (``GET /models``), so the first job does not.

        It imports the SDK's lazily loaded parts and opens a connection in
        each pool.  Best effort: stops at the first failure, never raises.
        """
        for client in self.clients:
            try:
                client.with_options(max_retries=0, timeout=5.0).get(
                    "/models", cast_to=httpx2.Response)
            except Exception:  # noqa: BLE001 - jobs report an unreachable provider
                return

    def close(self) -> None:
        """Close every client's connections."""
        for client in self.clients:
            client.close()

    def _closed(self, i: int) -> None:
        self._streams[i] -= 1


class Transport(httpx2.HTTPTransport):
    """httpx's transport, whose pool checks its idle connections without gevent's hub.

    Whenever a request starts or a response is closed, httpcore asks every
    idle connection of the pool whether its socket is readable (the server
    closed it), through ``select.poll``, which gevent patches: 10-13 % of a
    busy worker's CPU (py-spy).  This pool's connections answer with
    :func:`tasks.config.readable_now`; everything else is httpx's own.
    """

    def __init__(self, tls: Any, limits: httpx2.Limits) -> None:
        super().__init__(verify=tls, limits=limits)
        # The pool HTTPTransport builds, with httpcore's network_backend hook set.
        self._pool = httpcore2.ConnectionPool(
            ssl_context=tls, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=_Backend())


class _Backend(httpcore2.NetworkBackend):
    """httpcore's blocking-socket backend (gevent makes it cooperative), with :class:`_Stream`."""

    def __init__(self) -> None:
        self._sockets = httpcore2.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None
                    ) -> httpcore2.NetworkStream:
        return _Stream(self._sockets.connect_tcp(host, port, timeout, local_address,
                                                 socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore2.NetworkStream:
        return _Stream(self._sockets.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._sockets.sleep(seconds)


class _Stream(httpcore2.NetworkStream):
    """One of httpcore's streams, answering ``is_readable`` with :func:`readable_now`."""

    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner
        self.read = inner.read  # type: ignore[method-assign]
        self.write = inner.write  # type: ignore[method-assign]
        self.close = inner.close  # type: ignore[method-assign]

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            sock = self._inner.get_extra_info("socket")
            # As httpcore answers: a stream without a socket reads its end at once.
            return sock is None or sock.fileno() < 0 or readable_now(sock)
        return self._inner.get_extra_info(info)


class Completion:
    """An open completion stream; closing it closes the HTTP response.

    A stream that reached ``data: [DONE]`` yields its :class:`Finish` at once;
    the end of its body is read afterwards, in the background, so that the
    connection goes back to its pool without delaying the job's end.
    """

    def __init__(self, response: httpx2.Response, on_close: Callable[[], None]) -> None:
        self._response = response
        self._on_close: Callable[[], None] | None = on_close
        self._body: Iterator[bytes] | None = None  # set once [DONE] was read: to drain

    def __enter__(self) -> Iterator[str | Finish]:
        return self._pieces()

    def __exit__(self, *exc: object) -> None:
        if self._body is not None:
            gevent.spawn(self._drain_and_close, self._body)
            self._body = None
        else:
            self._close()

    def _drain_and_close(self, body: Iterator[bytes]) -> None:
        try:
            _drain(body)
        finally:
            self._close()

    def _close(self) -> None:
        self._response.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def _pieces(self) -> Iterator[str | Finish]:
        reason: str | None = None
        usage = None
        body = self._response.iter_bytes()
        try:
            for sse in SSEDecoder().iter_bytes(body):
                if sse.data.startswith("[DONE]"):
                    break
                chunk = json.loads(sse.data)
                if not isinstance(chunk, dict):
                    raise ProviderError("provider_stream_broken",
                                        f"a chunk that is not a JSON object: {chunk!r}",
                                        failover=True)
                if chunk.get("error"):
                    raise ProviderError("provider_stream_broken", _stream_error(chunk["error"]),
                                        failover=True)
                if chunk.get("usage"):
                    u = chunk["usage"]
                    usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        except httpx2.HTTPError as e:
            raise ProviderError("provider_stream_broken", f"{type(e).__name__}: {e}",
                                failover=True) from e
        except ValueError as e:  # a chunk that is not JSON
            raise ProviderError("provider_stream_broken", f"{type(e).__name__}: {e}",
                                failover=True) from e
        if reason is None:
            # A stream cut before [DONE] can end quietly.
            raise ProviderError("provider_stream_broken", "stream ended without finish_reason",
                                failover=True)
        self._body = body
        headers = self._response.headers
        yield Finish(reason, usage, _int(headers.get("x-ratelimit-remaining-tokens")),
                     duration_s(headers.get("x-ratelimit-reset-tokens")))


def _drain(body: Iterator[bytes]) -> None:
    # What follows [DONE] is the end of the chunked body; reading it lets httpx
    # put the connection back in its pool (the SDK's sync Stream closes the
    # response first, so every request paid a new connection).  A provider that
    # keeps the body open is cut off: the completion itself is complete.
    with gevent.Timeout(DRAIN_S, False), contextlib.suppress(httpx2.HTTPError):
        for _ in body:
            pass


def _stream_error(error: object) -> str:
    # Worded as the SDK words the same error (an APIError raised mid-stream).
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return f"APIError: {message}"


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a provider asks to wait: ``retry-after-ms``, else ``retry-after`` (s or a date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_tz(value)
        return max(0.0, email.utils.mktime_tz(when) - time.time()) if when else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(value: str | None) -> float | None:
    """Parse a rate-limit reset such as ``6m0s``, ``1.5s`` or ``20ms`` (OpenAI's header format)."""
    if not value:
        return None
    parts = _DURATION.findall(value)
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _message(e: openai.APIError) -> str:
    return f"{type(e).__name__}: {e.message}"
