"""The direct target: any OpenAI-compatible endpoint, streamed with the official SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Any, cast

import httpx2
import openai

from app.bench.config import BenchError
from app.bench.record import Stream


class DirectClient:
    """One ``AsyncOpenAI`` client with an unbounded connection pool, shared by every stream.

    Chunks go through the SDK's own request path (``client.post`` with
    ``cast_to=object``): its HTTP, errors and SSE decoding, but each chunk left
    as the decoded JSON dict.  Typed ``ChatCompletionChunk`` objects cost
    several times more CPU per chunk, and at 1,000 streams that CPU is client
    latency (see ``MEASURING.rst``).

    Example::

        client = DirectClient("http://127.0.0.1:8001/v1", "sk-x", "mock-1", None)
        await client.request(stream, t_step0, timeout_s=60)
    """

    def __init__(self, base_url: str, api_key: str, model: str,
                 counted: Callable[[str], int] | None) -> None:
        self.base_url = base_url
        self.model = model
        self.counted = counted
        http = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=4096),
            trust_env=False)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                         http_client=http)

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
                chunks = await self.client.post(
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
        except (openai.APIError, httpx2.HTTPError, OSError) as e:
            stream.fail("connection_error", f"{type(e).__name__}: {e}", perf_counter())
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
            await self.client.models.list(timeout=timeout_s)
        except openai.NotFoundError:
            return  # some servers have no /models; the first request will tell
        except openai.APIStatusError as e:
            raise BenchError(f"{self.base_url} answered HTTP {e.status_code}: {e.message}") \
                from None
        except (openai.APIError, httpx2.HTTPError, OSError) as e:
            raise BenchError(f"cannot reach {self.base_url}: {_reason(e)}") from None

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.close()


def _reason(e: BaseException) -> str:
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(e) or type(e).__name__
