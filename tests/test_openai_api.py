"""The OpenAI-compatible HTTP API, driven by the real ``openai`` SDK against the real stack."""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import redis

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tests.conftest import Proc, start_mock, start_web, start_worker, wait_for

MOCK_CONFIG = MockConfig(ttft_ms=40, itl_ms=15, output_tokens=12)
SLOW = {"ttft_ms": 50, "itl_ms": 60, "output_tokens": 40}
SLOW_CONFIG = MockConfig(**SLOW)  # type: ignore[arg-type]
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def base_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").replace("/ws", "/v1")


def sdk(ws_url: str, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(ws_url), api_key=key, max_retries=0, **options)


@pytest.fixture
def client(web: str, api_key: str) -> Iterator[openai.OpenAI]:
    with sdk(web, api_key) as c:
        yield c


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def metric(ws_url: str, name: str) -> float:
    """A sample of the front end's /metrics (one process: no multiprocess directory)."""
    url = ws_url.replace("ws://", "http://").replace("/ws", "/metrics")
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def jobs_of(r: redis.Redis, key: str) -> list[str]:
    """The ids of the jobs an API key has submitted."""
    kid = KeyStore(r).verify(key)
    assert kid is not None
    found = []
    for name in r.scan_iter(keys.job("*")):
        job_id = name.decode().rpartition(":")[2]
        if JOB_ID.match(job_id) and r.hget(name, "owner") == kid.key_id.encode():
            found.append(job_id)
    return found


def test_chat_stream_is_openai_chunks_with_the_models_text(client: openai.OpenAI) -> None:
    """stream=True: a role chunk, the mock's exact text, finish_reason, a usage chunk, then the end."""
    stream = client.chat.completions.create(
        model="mock-1", messages=chat("stream to me"), max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("stream to me", 8, MOCK_CONFIG)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and JOB_ID.match(chunks[0].id[9:])
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].model == "mock-1"


def test_chat_without_stream_returns_the_whole_completion(client: openai.OpenAI) -> None:
    """stream=False: one chat.completion with the text, finish_reason, usage and x-ratelimit headers."""
    raw = client.chat.completions.with_raw_response.create(
        model="mock-1", messages=chat("all at once"), max_tokens=20)
    assert raw.headers["x-ratelimit-limit-tokens"].isdigit()
    assert "x-ratelimit-remaining-requests" in raw.headers
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text("all at once", 20, MOCK_CONFIG)
    assert choice.finish_reason == "stop"  # the mock's natural end: 12 tokens
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_legacy_completions_stream_and_not(client: openai.OpenAI) -> None:
    """/v1/completions: text_completion objects, streamed or whole, with the mock's text."""
    whole = client.completions.create(model="mock-1", prompt="once upon a time", max_tokens=5)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == expected_text("once upon a time", 5, MOCK_CONFIG)
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    chunks = list(client.completions.create(
        model="mock-1", prompt="a legacy stream", max_tokens=7, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text("a legacy stream", 7, MOCK_CONFIG)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_job_error_is_an_error_chunk_or_a_502(client: openai.OpenAI) -> None:
    """A job the provider fails (it does not serve mock-2): an error chunk when streamed, 502 when not."""
    stream = client.chat.completions.create(model="mock-2", messages=chat("hi"), max_tokens=3,
                                            stream=True)
    with pytest.raises(openai.APIError) as e:
        list(stream)
    assert e.value.code == "provider_404" and e.value.type == "server_error"
    with pytest.raises(openai.InternalServerError) as e2:
        client.chat.completions.create(model="mock-2", messages=chat("hi"), max_tokens=3)
    assert e2.value.status_code == 502 and e2.value.code == "provider_404"


def test_http_requests_count_in_the_front_ends_metrics(web: str, client: openai.OpenAI) -> None:
    """A streamed request adds to the front end's submitted jobs, client TTFT and delivered TPOT."""
    names = ("sluice_jobs_submitted_total", "sluice_client_ttft_seconds_count",
             "sluice_delivered_tpot_seconds_count")
    before = [metric(web, n) for n in names]
    list(client.chat.completions.create(model="mock-1", messages=chat("count me"),
                                        max_tokens=4, stream=True))
    assert [metric(web, n) - b for n, b in zip(names, before, strict=True)] == [1, 1, 1]


def test_concurrent_streams_each_get_their_own_text(web: str, api_key: str) -> None:
    """Thirty simultaneous SDK streams through one front end: each gets exactly its text."""
    barrier = threading.Barrier(30)

    def one(i: int) -> tuple[str, str]:
        with sdk(web, api_key) as c:
            barrier.wait()
            prompt = f"stream number {i}"
            stream = c.chat.completions.create(model="mock-1", messages=chat(prompt),
                                               max_tokens=10, stream=True)
            return prompt, "".join(ch.choices[0].delta.content or "" for ch in stream)

    with ThreadPoolExecutor(30) as pool:
        for prompt, text in pool.map(one, range(30)):
            assert text == expected_text(prompt, 10, MOCK_CONFIG)


def test_models_lists_the_configured_models(client: openai.OpenAI) -> None:
    """GET /v1/models: OpenAI's list of the configured model names; one model by name."""
    assert [m.id for m in client.models.list()] == ["mock-1", "mock-2"]
    assert client.models.retrieve("mock-2").id == "mock-2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


@pytest.mark.parametrize(("request_", "error", "status", "code"), [
    ({"key": "sk-sluice-not-a-key"}, openai.AuthenticationError, 401, "unauthorized"),
    ({"model": "gpt-17"}, openai.NotFoundError, 404, "unknown_model"),
    ({"temperature": 9}, openai.BadRequestError, 400, "out_of_range"),
    ({"messages": [{"role": "god", "content": "x"}]}, openai.BadRequestError, 400, "bad_field"),
    ({"n": 3}, openai.BadRequestError, 400, "unsupported"),
    ({"messages": chat("x" * 4000)}, openai.APIStatusError, 413, "too_large"),
], ids=["bad key", "unknown model", "temperature", "bad role", "n", "huge body"])
def test_errors_raise_the_sdk_typed_exceptions(web: str, api_key: str, request_: dict[str, Any],
                                               error: type[openai.APIStatusError], status: int,
                                               code: str) -> None:
    """A refused request is an OpenAI error object with the right status: the SDK raises its type."""
    key = request_.pop("key", api_key)
    body = {"model": "mock-1", "messages": chat("hi"), "max_tokens": 3, **request_}
    with sdk(web, key) as c, pytest.raises(error) as e:
        c.chat.completions.create(**body)
    assert e.value.status_code == status and e.value.code == code
    assert isinstance(e.value.body, dict) and set(e.value.body) == {"message", "type", "param",
                                                                    "code"}
    if status != 401:
        assert "x-ratelimit-limit-tokens" in e.value.response.headers


def test_revoked_key_is_refused(web: str, r: redis.Redis) -> None:
    """A key that worked gets 401 once revoked."""
    store = KeyStore(r)
    raw, info = store.create("http-short-lived", "free")
    with sdk(web, raw) as c:
        c.models.list()
        store.revoke(info.key_id)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_rate_limited_request_gets_429_with_retry_after(web: str, r: redis.Redis) -> None:
    """Past the key's token bucket: RateLimitError, with Retry-After from the bucket's refill."""
    key = KeyStore(r).create("http-thin", "thin")[0]
    streams, refusal = [], None
    with sdk(web, key) as c:
        for _ in range(20):  # each reserves ~90 prompt + 64 output tokens of 600
            try:
                streams.append(c.chat.completions.create(
                    model="mock-1", messages=chat("lorem ipsum " * 40), max_tokens=64,
                    stream=True))
            except openai.RateLimitError as e:
                refusal = e
                break
        for s in streams:
            s.close()
    assert refusal is not None and refusal.code == "rate_limited"
    assert refusal.type == "rate_limit_error"
    headers = refusal.response.headers
    # 600 tokens per minute refill at 10 per second: the wait is the deficit / 10.
    assert 1 <= int(headers["retry-after"]) <= 16
    assert 0 < int(headers["retry-after-ms"]) <= 16_000
    assert int(headers["x-ratelimit-remaining-tokens"]) < 154


# -- a slow model, a front end that cancels on disconnect, workers killed at will ----------

@pytest.fixture(scope="module")
def slow_env(start_proc: Callable[..., Proc], sluice_env: dict[str, str]) -> dict[str, str]:
    """A slow model on a queue of this module's own, so only its workers take these jobs."""
    _, url = start_mock(start_proc, **SLOW)
    return {**sluice_env, "OPENAI_BASE_URL": url, "SLUICE_QUEUE": "openai-slow",
            "SLUICE_LEASE_TTL_S": "1", "SLUICE_METRICS_PORT": "0",
            "SLUICE_WORKER_CONCURRENCY": "20", "SLUICE_CANCEL_ON_DISCONNECT": "1"}


@pytest.fixture(scope="module")
def slow_web(start_proc: Callable[..., Proc], slow_env: dict[str, str]) -> str:
    return start_web(start_proc, slow_env)


@pytest.fixture(scope="module")
def slow_worker(start_proc: Callable[..., Proc], slow_env: dict[str, str]) -> Proc:
    return start_worker(start_proc, slow_env, "http-slow")


def test_worker_death_mid_stream_ends_the_stream_with_an_error(
        start_proc: Callable[..., Proc], slow_env: dict[str, str], slow_web: str,
        r: redis.Redis, request: pytest.FixtureRequest) -> None:
    """kill -9 the worker mid-stream: the stream ends with an error chunk; a waiting request gets the re-run's whole text."""
    doomed = start_worker(start_proc, slow_env, "http-doomed")
    key = KeyStore(r).create("http-crash", "unlimited")[0]
    with sdk(slow_web, key) as c, ThreadPoolExecutor(1) as pool:
        stream = c.chat.completions.create(model="mock-1", messages=chat("survive a crash"),
                                           max_tokens=30, stream=True)
        waiting = pool.submit(c.chat.completions.create, model="mock-1",
                              messages=chat("wait through a crash"), max_tokens=30)
        streamed = "".join(next(stream).choices[0].delta.content or "" for _ in range(6))
        assert streamed
        both_running = lambda: [j for j in jobs_of(r, key) if int(r.hget(keys.job(j), "seq") or 0) > 1]  # noqa: E731
        wait_for(lambda: len(both_running()) == 2, 10, "both jobs to be generating")
        doomed.kill(signal.SIGKILL)
        doomed.popen.wait()
        request.getfixturevalue("slow_worker")  # the heir, started only now
        with pytest.raises(openai.APIError) as e:
            for chunk in stream:
                streamed += chunk.choices[0].delta.content or ""
        assert e.value.code == "job_restarted", e.value
        assert expected_text("survive a crash", 30, SLOW_CONFIG).startswith(streamed)
        completion = waiting.result(timeout=30)
    assert completion.choices[0].message.content == expected_text(
        "wait through a crash", 30, SLOW_CONFIG)
    assert completion.usage is not None and completion.usage.completion_tokens == 30


def test_disconnect_cancels_the_job_when_configured(slow_worker: Proc, slow_web: str,
                                                    r: redis.Redis) -> None:
    """With SLUICE_CANCEL_ON_DISCONNECT=1, a client leaving a stream or a wait cancels its job; no follow leaks."""
    key = KeyStore(r).create("http-drop", "unlimited")[0]
    status = lambda j: (r.hget(keys.job(j), "status") or b"").decode()  # noqa: E731
    with sdk(slow_web, key) as c:
        stream = c.chat.completions.create(model="mock-1", messages=chat("drop me"),
                                           max_tokens=40, stream=True)
        chunks = [next(stream) for _ in range(3)]
        stream.close()
        job_id = chunks[0].id.removeprefix("chatcmpl-")
        wait_for(lambda: status(job_id) == "cancelled", 10, "the streamed job's cancel")
    with sdk(slow_web, key, timeout=0.5) as c, pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="mock-1", messages=chat("wait for me"), max_tokens=40)
    waited = (set(jobs_of(r, key)) - {job_id}).pop()
    wait_for(lambda: status(waited) == "cancelled", 10, "the waited-for job's cancel")
    wait_for(lambda: metric(slow_web, "sluice_followed_jobs") == 0, 5, "the follows to be undone")


def test_stream_events_are_valid_sse(client: openai.OpenAI) -> None:
    """The raw stream is SSE: data lines of JSON objects, blank-line separated, ending with [DONE]."""
    with client.chat.completions.with_streaming_response.create(
            model="mock-1", messages=chat("raw bytes"), max_tokens=3, stream=True) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = b"".join(resp.iter_bytes()).decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert isinstance(json.loads(event[6:]), dict)


def test_kept_alive_connection_serves_the_next_request(web: str, api_key: str) -> None:
    """One HTTP/1.1 connection, idle between requests, serves streamed and whole answers in turn."""
    host, port = web.split("/")[2].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for i, stream in enumerate((True, False, True)):
            if i:
                time.sleep(0.2)  # idle: the server is waiting to read the next request
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"model": "mock-1", "messages": chat(f"kept alive {i}"), "max_tokens": 2,
                 "stream": stream}), {"Authorization": f"Bearer {api_key}"})
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200 and resp.getheader("Connection") != "close"
            assert body.endswith("data: [DONE]\n\n") if stream else json.loads(body)["choices"]
    finally:
        conn.close()
