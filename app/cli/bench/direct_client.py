"""The direct target: any OpenAI-compatible endpoint, streamed with the official SDK.

The same client is the ``http`` target: Sluice's own OpenAI-compatible API
(``/v1/chat/completions``, Server-Sent Events) with a Sluice key.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from time import perf_counter
from typing import Any, cast

import httpx2
import openai

from app.cli.bench.config import BenchError
from app.cli.bench.record import Stream

#: SDK clients (connection pools) the lanes are spread over; request N of lane L uses L % POOLS.
POOLS = 16


class DirectClient:
    """Streams chat completions with ``openai.AsyncOpenAI``, shared by every lane of a step.

    Requests go through the SDK's documented custom-request path
    (``client.post(..., cast_to=object, stream=True)``): the SDK's HTTP, errors
    and SSE decoding, with each chunk left as its decoded JSON dict.  Typed
    ``ChatCompletionChunk`` objects cost more CPU per chunk, and at 1,000
    streams the bench's CPU is latency it adds (see README.rst, "Measuring Sluice").

    Example::

        client = DirectClient("http://127.0.0.1:8001/v1", "sk-x", "mock-1", None)
        await client.request(stream, t_step0, timeout_s=60)
    """

    def __init__(self, base_url: str | tuple[str, ...], api_key: str, model: str,
                 counted: Callable[[str], int] | None) -> None:
        # Several base URLs (Sluice's front ends) share the lanes round robin.
        urls = (base_url,) if isinstance(base_url, str) else base_url
        self.base_url = ", ".join(urls)
        self.model = model
        self.counted = counted
        # httpx's pool walks all its connections whenever a request starts or
        # ends: with one pool of 1,000 connections that was a quarter of the
        # bench's CPU.  So lanes are spread over several clients, each with its
        # own pool, sharing one TLS context (loading the CAs takes ~20 ms).
        tls = httpx2.create_ssl_context(trust_env=False)
        self.clients = [openai.AsyncOpenAI(
            base_url=urls[i % len(urls)], api_key=api_key, max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=4096),
                verify=tls, trust_env=False))
            for i in range(POOLS)]

    async def request(self, stream: Stream, t_step0: float, timeout_s: float) -> None:
        """Stream one chat completion, timing every chunk that carries text."""
        prompt = stream.prompt
        body = {"model": self.model, "messages": prompt.messages,
                "max_tokens": prompt.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        reason: str | None = None
        completion: int | None = None
        stream.sent(t_step0)
        try:
            async with asyncio.timeout(timeout_s):
                chunks = await self.clients[stream.rec.conn % POOLS].post(
                    "/chat/completions", body=body, cast_to=object,
                    options={"timeout": timeout_s}, stream=True,
                    stream_cls=openai.AsyncStream[object])
                async with chunks:
                    async for item in chunks:
                        chunk = cast(dict[str, Any], item)  # JSON objects, as decoded
                        now = perf_counter()
                        usage = chunk.get("usage")
                        if usage:
                            completion = usage.get("completion_tokens")
                            stream.rec.prompt_tokens = usage.get("prompt_tokens")
                        for choice in chunk.get("choices") or ():
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                stream.token(text, now)
                            if choice.get("finish_reason"):
                                reason = choice["finish_reason"]
        except TimeoutError:
            stream.fail("timeout", f"no end of the stream within {timeout_s:g} s", perf_counter())
            return
        except openai.APIStatusError as e:
            stream.fail(f"http_{e.status_code}", e.message, perf_counter())
            return
        except openai.APITimeoutError:
            stream.fail("timeout", "the request timed out", perf_counter())
            return
        except (openai.APIConnectionError, httpx2.HTTPError, OSError) as e:
            inner = e.__cause__ or e  # "Connection error." says less than httpx's reason
            stream.fail("connection_error", f"{type(inner).__name__}: {inner}", perf_counter())
            return
        except openai.APIError as e:  # an error event inside the stream
            stream.fail("stream_error", e.message, perf_counter())
            return
        if reason is None:
            stream.fail("stream_broken", "the stream ended without a finish_reason",
                        perf_counter())
            return
        stream.finish(reason, completion, perf_counter(), self.counted)

    async def probe(self, timeout_s: float = 10.0) -> None:
        """List the models once.

        :raises BenchError: the endpoint cannot be reached or rejects the key.
        """
        try:
            await self.clients[0].models.list(timeout=timeout_s)
        except openai.NotFoundError:
            return  # some servers have no /models; the first request will tell
        except openai.APIStatusError as e:
            raise BenchError(f"{self.base_url} answered HTTP {e.status_code}: {e.message}") \
                from None
        except (openai.APIError, httpx2.HTTPError, OSError) as e:
            raise BenchError(f"cannot reach {self.base_url}: {_reason(e)}") from None

    async def close(self) -> None:
        """Close the connection pools."""
        await asyncio.gather(*(c.close() for c in self.clients))


def _reason(e: BaseException) -> str:
    # The OSError under the SDK's and httpx's wrappers says it best ("connection refused").
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            # asyncio's strerror is "Connect call failed (...)"; DNS errnos are negative.
            return os.strerror(cause.errno).lower() if cause.errno and cause.errno > 0 \
                else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    return str(e) or type(e).__name__
