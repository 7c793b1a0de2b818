"""The model provider client: any OpenAI-compatible endpoint, through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx2
import openai

from tasks.config import Settings
from tasks.runtime import Finish, ProviderError, Usage


class Provider:
    """Streams chat completions from one OpenAI-compatible deployment.

    Implements :class:`tasks.runtime.Provider`.

    Example::

        provider = Provider(Settings.from_env())
        with provider.stream("mock-1", [{"role": "user", "content": "hi"}], 16) as chunks:
            for piece in chunks: ...
    """

    def __init__(self, settings: Settings) -> None:
        # Hundreds of concurrent streams per worker process: the SDK's default
        # pool (100 connections) would queue them.
        http = openai.DefaultHttpxClient(limits=httpx2.Limits(
            max_connections=None, max_keepalive_connections=settings.worker_concurrency))
        self.client = openai.OpenAI(
            base_url=settings.openai_base_url, api_key=settings.openai_api_key,
            max_retries=settings.provider_max_retries, timeout=settings.provider_timeout_s,
            http_client=http)
        #: A bounded label for metrics: the deployment's host and port.
        self.name = urlparse(settings.openai_base_url).netloc or "default"

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
        try:
            # The SDK's own request path (retries, errors, SSE decoding) with
            # chunks left as dicts: typed ChatCompletionChunk objects cost ~5x
            # more CPU per token (see README, "Measuring Sluice").
            stream = self.client.post("/chat/completions", body=body, cast_to=object,
                                      stream=True, stream_cls=openai.Stream[object])
        except openai.APIStatusError as e:
            raise ProviderError(f"provider_{e.status_code}", _message(e)) from e
        except openai.APIError as e:
            raise ProviderError("provider_unavailable", _message(e)) from e
        return Completion(stream)  # type: ignore[arg-type]  # chunks are JSON objects


class Completion:
    """An open completion stream; closing it closes the HTTP response."""

    def __init__(self, stream: openai.Stream[dict[str, Any]]) -> None:
        self._stream = stream

    def __enter__(self) -> Iterator[str | Finish]:
        return self._pieces()

    def __exit__(self, *exc: object) -> None:
        self._stream.close()

    def _pieces(self) -> Iterator[str | Finish]:
        reason: str | None = None
        usage = None
        try:
            for chunk in self._stream:
                if chunk.get("usage"):
                    u = chunk["usage"]
                    usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        except openai.APIError as e:
            raise ProviderError("provider_stream_broken", _message(e)) from e
        except httpx2.HTTPError as e:
            raise ProviderError("provider_stream_broken", f"{type(e).__name__}: {e}") from e
        if reason is None:
            # The SDK ends quietly when a stream is cut before [DONE].
            raise ProviderError("provider_stream_broken", "stream ended without finish_reason")
        yield Finish(reason, usage)


def _message(e: openai.APIError) -> str:
    return f"{type(e).__name__}: {e.message}"
