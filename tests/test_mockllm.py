"""The mock model, driven as a real subprocess through the official openai SDK."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.cli.dev.mockllm import VOCAB, MockConfig, count_prompt_tokens, expected_text, get_encoding

REPO = Path(__file__).resolve().parents[1]
FAST = MockConfig(ttft_ms=5, itl_ms=1, output_tokens=20, models=("mock-1", "mock-2"))
TIMED = MockConfig(ttft_ms=100, itl_ms=20, output_tokens=1000)
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Tell me a story."}]


@contextlib.contextmanager
def running_mock(config: MockConfig) -> Iterator[str]:
    """Run ``serve(config)`` in a subprocess and yield its base URL (ending in ``/v1``)."""
    code = f"from app.cli.dev.mockllm import serve, MockConfig; serve({config!r}, port=0)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"mockllm listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, f"mock did not start, printed {line!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def sdk_client(base_url: str) -> Iterator[openai.OpenAI]:
    """Yield an SDK client that never retries, so injected failures surface at once."""
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=10) as client:
        yield client


def stats(base_url: str) -> dict[str, int]:
    """Read the mock's counters."""
    url = base_url.removesuffix("/v1") + "/mock/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        result: dict[str, int] = json.load(response)
        return result


def post_raw(base_url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the chat endpoint without the SDK and return the status and JSON answer."""
    request = urllib.request.Request(base_url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


@pytest.fixture(scope="module")
def fast_url() -> Iterator[str]:
    with running_mock(FAST) as url:
        yield url


@pytest.fixture(scope="module")
def timed_url() -> Iterator[str]:
    with running_mock(TIMED) as url:
        yield url


@pytest.fixture
def fast(fast_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(fast_url) as client:
        yield client


def test_vocabulary_words_are_single_tokens() -> None:
    """Every vocabulary word, with its leading space, is exactly one cl100k token."""
    enc = get_encoding()
    assert [w for w in VOCAB if len(enc.encode_ordinary(w)) != 1] == []
    assert len(set(VOCAB)) == len(VOCAB)


def test_count_prompt_tokens_adds_chat_overhead() -> None:
    """Prompt tokens follow OpenAI's chat accounting (3 per message, 1 per name, 3 priming)."""
    assert count_prompt_tokens([{"role": "user", "content": "hello"}]) == 8
    assert count_prompt_tokens([{"role": "user", "content": "hello", "name": "bob"}]) == 10


def test_expected_text_is_seeded_and_prefix_stable() -> None:
    """A shorter completion is a prefix of a longer one, and the seed changes the text."""
    long = expected_text(MESSAGES, None, FAST)
    assert long.startswith(expected_text(MESSAGES, 5, FAST))
    assert expected_text(MESSAGES, None, FAST, seed=1) != long
    assert expected_text(MESSAGES, None, FAST, seed=0) == long


def test_streaming_text_matches_expected_text(fast: openai.OpenAI) -> None:
    """A stream yields one token per chunk, role first, and exactly expected_text, then stop."""
    chunks = list(fast.chat.completions.create(model="mock-1", messages=MESSAGES, seed=7,
                                               stream=True))
    content = [c.choices[0].delta.content for c in chunks if not c.choices[0].finish_reason]
    assert all(content)
    text = "".join(c or "" for c in content)
    assert text == expected_text(MESSAGES, None, FAST, seed=7)
    assert len(content) == FAST.output_tokens == len(get_encoding().encode_ordinary(text))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * len(content) + ["stop"]
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_usage_chunk_when_requested(fast: openai.OpenAI) -> None:
    """With include_usage the last chunk has no choices and carries the token counts."""
    chunks = list(fast.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == count_prompt_tokens(MESSAGES)
    assert usage.completion_tokens == FAST.output_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_non_streaming_completion(fast: openai.OpenAI) -> None:
    """Without stream the answer is one chat.completion with the same text and usage."""
    completion = fast.chat.completions.create(model="mock-2", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == "mock-2"
    assert completion.choices[0].message.content == expected_text(MESSAGES, None, FAST)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == FAST.output_tokens


def test_max_tokens_cuts_with_finish_reason_length(fast: openai.OpenAI) -> None:
    """max_tokens below the natural length truncates the stream and reports length."""
    chunks = list(fast.chat.completions.create(model="mock-1", messages=MESSAGES, max_tokens=5,
                                               stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected_text(MESSAGES, 5, FAST)
    assert len(chunks) == 6
    assert chunks[-1].choices[0].finish_reason == "length"


def test_max_completion_tokens_is_honoured(fast: openai.OpenAI) -> None:
    """max_completion_tokens limits the output like max_tokens does."""
    completion = fast.chat.completions.create(model="mock-1", messages=MESSAGES,
                                              max_completion_tokens=3)
    assert completion.choices[0].message.content == expected_text(MESSAGES, 3, FAST)
    assert completion.choices[0].finish_reason == "length"


def test_models_endpoint_lists_configured_models(fast: openai.OpenAI) -> None:
    """GET /v1/models lists the configured models in OpenAI's list format."""
    assert [m.id for m in fast.models.list()] == ["mock-1", "mock-2"]


def test_unknown_model_raises_not_found(fast: openai.OpenAI) -> None:
    """An unserved model is a 404 the SDK raises as NotFoundError."""
    with pytest.raises(openai.NotFoundError) as info:
        fast.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert info.value.code == "model_not_found"


def test_bad_json_is_a_400_error(fast_url: str) -> None:
    """A body that is not JSON gets an OpenAI-style invalid_request_error."""
    status, body = post_raw(fast_url, b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


def test_missing_messages_is_a_400_error(fast_url: str) -> None:
    """A request without messages gets an OpenAI-style invalid_request_error."""
    status, body = post_raw(fast_url, b'{"model": "mock-1"}')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages"


def test_fail_mode_429_raises_rate_limit_error() -> None:
    """fail_mode 429 answers before any token and the SDK raises RateLimitError."""
    with running_mock(MockConfig(ttft_ms=0, itl_ms=0, fail_rate=1.0, fail_mode="429")) as url, \
            sdk_client(url) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True)
        assert stats(url)["failures_injected"] == 1


def test_fail_mode_500_raises_internal_server_error() -> None:
    """fail_mode 500 answers before any token and the SDK raises InternalServerError."""
    with running_mock(MockConfig(ttft_ms=0, itl_ms=0, fail_rate=1.0, fail_mode="500")) as url, \
            sdk_client(url) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True)


def test_fail_mode_cut_drops_the_stream_midway() -> None:
    """fail_mode cut sends some tokens, then drops the connection without [DONE]."""
    config = MockConfig(ttft_ms=0, itl_ms=1, output_tokens=10, fail_rate=1.0, fail_mode="cut")
    received: list[str] = []
    with running_mock(config) as url, sdk_client(url) as client:
        stream = client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIConnectionError):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == expected_text(MESSAGES, 5, config)
        assert stats(url)["streams_completed"] == 0


def test_time_to_first_token_matches_config(timed_url: str) -> None:
    """The first token arrives after about ttft_ms (100 ms +/- 60 ms)."""
    arrivals = []
    with sdk_client(timed_url) as client:
        start = time.perf_counter()
        # Read to the end: closing early would count an abort that the abort test could see.
        stream = client.chat.completions.create(model="mock-1", messages=MESSAGES, max_tokens=2,
                                                stream=True)
        for chunk in stream:
            if chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
    assert 0.040 <= arrivals[0] - start <= 0.160


def test_inter_token_latency_matches_config(timed_url: str) -> None:
    """Tokens are spaced itl_ms apart on average (20 ms +/- 10 ms)."""
    arrivals = []
    with sdk_client(timed_url) as client:
        stream = client.chat.completions.create(model="mock-1", messages=MESSAGES, max_tokens=30,
                                                stream=True)
        for chunk in stream:
            if chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
    assert len(arrivals) == 30
    assert 0.010 <= (arrivals[-1] - arrivals[0]) / 29 <= 0.030


def test_closing_a_stream_counts_an_abort(timed_url: str) -> None:
    """A client that closes mid-stream makes the mock stop and count streams_aborted."""
    before = stats(timed_url)
    with sdk_client(timed_url) as client:
        stream = client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True)
        next(stream)
        next(stream)
        stream.close()
    deadline = time.monotonic() + 5
    after = stats(timed_url)
    while after["streams_aborted"] == before["streams_aborted"] and time.monotonic() < deadline:
        time.sleep(0.01)
        after = stats(timed_url)
    assert after["streams_aborted"] == before["streams_aborted"] + 1
    assert after["streams_completed"] == before["streams_completed"]
    assert after["active_streams"] == 0
