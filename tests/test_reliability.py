"""Worker death, cancellation and chat-session ordering, on a stack with a slow model."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tests.conftest import Client, Proc, start_mock, start_web, start_worker, text_of, wait_for

SLOW = {"ttft_ms": 50, "itl_ms": 60, "output_tokens": 40}
SLOW_CONFIG = MockConfig(**SLOW)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def slow_mock(start_proc: Callable[..., Proc]) -> str:
    return start_mock(start_proc, **SLOW)[1]


@pytest.fixture(scope="module")
def slow_env(sluice_env: dict[str, str], slow_mock: str) -> dict[str, str]:
    """A separate queue and model, so only this module's workers take these jobs."""
    return {**sluice_env, "OPENAI_BASE_URL": slow_mock, "SLUICE_QUEUE": "slow",
            "SLUICE_LEASE_TTL_S": "1", "SLUICE_METRICS_PORT": "0"}


@pytest.fixture(scope="module")
def slow_web(start_proc: Callable[..., Proc], slow_env: dict[str, str]) -> str:
    return start_web(start_proc, slow_env)


@pytest.fixture
def slow_worker(start_proc: Callable[..., Proc], slow_env: dict[str, str]) -> Iterator[Proc]:
    proc = start_worker(start_proc, {**slow_env, "SLUICE_WORKER_CONCURRENCY": "20"}, "slow")
    yield proc
    proc.stop()


def mock_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.loads(resp.read())


def test_killed_worker_job_finishes_on_another(start_proc: Callable[..., Proc],
                                               slow_env: dict[str, str], slow_web: str,
                                               r: redis.Redis,
                                               connect: Callable[..., Client]) -> None:
    """kill -9 the worker mid-stream, start another: restart, the whole text, seq contiguous, slot freed."""
    first = start_worker(start_proc, {**slow_env, "SLUICE_WORKER_CONCURRENCY": "20"}, "doomed")
    # A one-job-at-a-time key: its slot must come back after the crash.
    c = connect(slow_web, key=KeyStore(r).create("crash", "tiny")[0])
    c.send(type="generate", prompt="survive a crash", max_tokens=30)
    job_id = c.recv()["job_id"]
    for _ in range(5):
        assert c.recv()["type"] == "token"
    first.kill(signal.SIGKILL)
    first.popen.wait()
    second = start_worker(start_proc, {**slow_env, "SLUICE_WORKER_CONCURRENCY": "20"}, "heir")
    try:
        ev = c.finish({job_id})[job_id]
    finally:
        second.stop()
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    kinds = [e["type"] for e in ev]
    assert "restart" in kinds and kinds[-1] == "done"
    assert text_of(ev) == expected_text("survive a crash", 30, SLOW_CONFIG), json.dumps(ev)
    assert ev[-1]["metrics"]["attempts"] == 2

    def admitted_again() -> bool:
        c.send(type="generate", ref="next", prompt="after the crash", max_tokens=1)
        return c.until(lambda f: f.get("ref") == "next")["type"] == "queued"
    wait_for(admitted_again, 5, "the concurrency slot to be released")


def test_cancel_stops_generation_promptly(slow_worker: Proc, slow_web: str, slow_mock: str,
                                          connect: Callable[[str], Client]) -> None:
    """cancel ends the job with error 'cancelled' within one token, and the model sees its stream closed."""
    before = mock_stats(slow_mock)["streams_aborted"]
    c = connect(slow_web)
    c.send(type="generate", prompt="cancel me", max_tokens=40)
    job_id = c.recv()["job_id"]
    seen = c.until(lambda f: f.get("type") == "token")["seq"]
    c.send(type="cancel", job_id=job_id)
    end = c.until(lambda f: f.get("type") in ("done", "error"))
    assert end["type"] == "error" and end["code"] == "cancelled"
    # At most the one token being written when the cancel came (README: "within one token").
    assert end["seq"] <= seen + 2, f"{end['seq'] - seen - 1} tokens after the cancel"
    wait_for(lambda: mock_stats(slow_mock)["streams_aborted"] > before, 5,
             "the mock to see the stream closed")


def test_session_jobs_run_one_after_another(slow_worker: Proc, slow_web: str,
                                            connect: Callable[[str], Client]) -> None:
    """Three jobs of one session run strictly in order: each starts after the previous ends."""
    c = connect(slow_web)
    for i in range(3):
        c.send(type="generate", ref=i, prompt=f"turn {i}", max_tokens=4, session="chat-1")
    jobs = [c.until(lambda f: f.get("type") == "queued")["job_id"] for _ in range(3)]
    c.finish(set(jobs))
    order = [f["job_id"] for f in c.frames if f["type"] in ("token", "done")]
    # Collapse runs: strictly sequential means each job's frames are contiguous, in order.
    runs = [j for i, j in enumerate(order) if i == 0 or order[i - 1] != j]
    assert runs == jobs


def test_jobs_without_session_run_together(slow_worker: Proc, slow_web: str,
                                           connect: Callable[[str], Client]) -> None:
    """Three jobs without a session overlap: every job has a token before the first ends."""
    c = connect(slow_web)
    for i in range(3):
        c.send(type="generate", ref=i, prompt=f"parallel {i}", max_tokens=8)
    jobs = [c.until(lambda f: f.get("type") == "queued")["job_id"] for _ in range(3)]
    first_done = c.until(lambda f: f.get("type") == "done")
    started = {f["job_id"] for f in c.frames if f["type"] == "token"}
    assert started == set(jobs), f"only {len(started)} jobs had started when {first_done['job_id']} ended"
    c.finish(set(jobs) - {first_done["job_id"]})


def test_cancel_before_first_token_closes_the_provider_stream(
        start_proc: Callable[..., Proc], slow_env: dict[str, str], slow_web: str,
        connect: Callable[[str], Client]) -> None:
    """A job waiting on a slow first token is cancelled at once, not after the token."""
    _, sleepy = start_mock(start_proc, ttft_ms=3000, itl_ms=50, output_tokens=10)
    # A long lease: the heartbeat's cancel check (every lease/3) must not be what stops it.
    worker = start_worker(start_proc, {**slow_env, "OPENAI_BASE_URL": sleepy,
                                       "SLUICE_LEASE_TTL_S": "10",
                                       "SLUICE_WORKER_CONCURRENCY": "5"}, "sleepy")
    try:
        c = connect(slow_web)
        c.send(type="generate", prompt="think long", max_tokens=10)
        job_id = c.recv()["job_id"]
        wait_for(lambda: mock_stats(sleepy)["streams_started"] >= 1, 10,
                 "the worker to call the model")
        t0 = time.monotonic()
        c.send(type="cancel", job_id=job_id)
        end = c.until(lambda f: f.get("type") in ("done", "error"))
        assert end["type"] == "error" and end["code"] == "cancelled"
        assert time.monotonic() - t0 < 1.0, "the cancel waited for the first token"
        assert not [f for f in c.events()[job_id] if f["type"] == "token"]
        wait_for(lambda: mock_stats(sleepy)["streams_aborted"] >= 1, 10,
                 "the mock to see the stream closed")
    finally:
        worker.stop()


def test_disconnect_cancels_only_when_configured(start_proc: Callable[..., Proc],
                                                 slow_env: dict[str, str], slow_web: str,
                                                 slow_worker: Proc, r: redis.Redis,
                                                 connect: Callable[..., Client]) -> None:
    """By default a dropped socket's job runs on; with SLUICE_CANCEL_ON_DISCONNECT=1 it is cancelled."""
    cancelling_web = start_web(start_proc, {**slow_env, "SLUICE_CANCEL_ON_DISCONNECT": "1"})
    job_ids = {}
    for name, url in (("default", slow_web), ("cancelling", cancelling_web)):
        c = connect(url)
        c.send(type="generate", prompt=f"drop me {name}", max_tokens=20)
        job_ids[name] = c.recv()["job_id"]
        c.until(lambda f: f.get("type") == "token")
        c.close()
    status = lambda j: (r.hget(keys.job(j), "status") or b"").decode()  # noqa: E731
    wait_for(lambda: status(job_ids["cancelling"]) == "cancelled", 10, "the cancel")
    wait_for(lambda: status(job_ids["default"]) == "done", 10, "the uncancelled job to finish")


def test_relay_survives_its_pubsub_connection_being_killed(
        slow_worker: Proc, slow_web: str, r: redis.Redis,
        connect: Callable[..., Client]) -> None:
    """Redis drops the front end's pub/sub connection mid-stream: the client still gets every token."""
    c = connect(slow_web)
    c.send(type="generate", prompt="through a storm", max_tokens=30)
    job_id = c.recv()["job_id"]
    for _ in range(3):
        c.until(lambda f: f.get("type") == "token")
    assert r.client_kill_filter(_type="pubsub") >= 1
    ev = c.finish({job_id})[job_id]
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    assert text_of(ev) == expected_text("through a storm", 30, SLOW_CONFIG)


def test_warm_shutdown_lets_running_streams_finish(start_proc: Callable[..., Proc],
                                                   slow_env: dict[str, str], slow_web: str,
                                                   connect: Callable[..., Client]) -> None:
    """SIGTERM to a worker mid-stream: the stream runs to its end, then the worker exits."""
    worker = start_worker(start_proc, {**slow_env, "SLUICE_WORKER_CONCURRENCY": "5"}, "retiring")
    c = connect(slow_web)
    c.send(type="generate", prompt="finish before you go", max_tokens=20)
    job_id = c.recv()["job_id"]
    c.until(lambda f: f.get("type") == "token")
    worker.popen.send_signal(signal.SIGTERM)
    ev = c.finish({job_id})[job_id]
    assert ev[-1]["type"] == "done" and "restart" not in [e["type"] for e in ev]
    assert text_of(ev) == expected_text("finish before you go", 20, SLOW_CONFIG)
    assert worker.popen.wait(15) == 0
