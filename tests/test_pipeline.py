"""The streaming pipeline end to end: socket → Celery → worker → event log → socket."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tasks.tokens import count_message_tokens
from tests.conftest import Client, Proc, text_of, wait_for

MOCK_CONFIG = MockConfig(ttft_ms=40, itl_ms=15, output_tokens=12)


def test_one_job_streams_queued_then_contiguous_tokens(web: str, r: redis.Redis,
                                                       connect: Callable[[str], Client]) -> None:
    """queued comes first, seq is 0..n with no gap, text is the mock's, done has usage and metrics."""
    c = connect(web)
    c.send(type="generate", ref="a", prompt="hello there", max_tokens=8)
    queued = c.recv()
    assert queued["type"] == "queued" and queued["ref"] == "a"
    job_id = queued["job_id"]
    events = c.finish({job_id})[job_id]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert text_of(events) == expected_text("hello there", 8, MOCK_CONFIG)
    done = events[-1]
    assert done["type"] == "done"
    assert done["usage"] == {
        "prompt_tokens": count_message_tokens([{"role": "user", "content": "hello there"}]),
        "completion_tokens": 8}
    created_ms, started_ms = (int(v) for v in r.hmget(keys.job(job_id), ["created_ms",
                                                                          "started_ms"]))
    assert done["metrics"]["queue_wait_ms"] == started_ms - created_ms
    assert MOCK_CONFIG.ttft_ms <= done["metrics"]["provider_ttft_ms"] < 1000
    assert 0 < done["metrics"]["tpot_ms"] <= MOCK_CONFIG.itl_ms * 4


def test_ten_jobs_back_to_back_are_all_acknowledged_first(web: str, connect: Callable[[str], Client]) -> None:
    """Ten generates in a row: ten queued frames before any job ends; every job complete and in order."""
    c = connect(web)
    prompts = [f"prompt number {i}" for i in range(10)]
    for i, p in enumerate(prompts):
        c.send(type="generate", ref=i, prompt=p, max_tokens=6)
    first_end = None
    job_of_ref: dict[int, str] = {}
    while len(job_of_ref) < 10:
        f = c.recv()
        if f["type"] == "queued":
            job_of_ref[f["ref"]] = f["job_id"]
        elif f["type"] in ("done", "error") and first_end is None:
            first_end = f
    assert first_end is None, "a job ended before all ten were acknowledged"
    events = c.finish(set(job_of_ref.values()))
    for i, p in enumerate(prompts):
        ev = events[job_of_ref[i]]
        assert [e["seq"] for e in ev] == list(range(len(ev)))
        assert ev[-1]["type"] == "done"
        assert text_of(ev) == expected_text(p, 6, MOCK_CONFIG)


def test_two_hundred_sockets_against_one_worker(web: str, worker: Proc, api_key: str) -> None:
    """200 sockets with one job each, one worker process: all complete, no gaps, no duplicates."""
    barrier = threading.Barrier(200)

    def one(i: int) -> tuple[str, list[dict[str, Any]]]:
        c = Client(web, api_key, timeout_s=60)
        try:
            barrier.wait()
            prompt = f"socket {i}"
            c.send(type="generate", prompt=prompt, max_tokens=10)
            job_id = c.recv()["job_id"]
            return prompt, c.finish({job_id})[job_id]
        finally:
            c.close()

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    for prompt, ev in results:
        assert [e["seq"] for e in ev] == list(range(len(ev))), "gap or duplicate"
        assert ev[-1]["type"] == "done"
        assert text_of(ev) == expected_text(prompt, 10, MOCK_CONFIG)


def test_resume_on_another_front_end_after_disconnect(web: str, web2: str,
                                                      connect: Callable[[str], Client]) -> None:
    """Drop the socket mid-stream, resume on a second front-end process: the rest, no gap, no dup."""
    c = connect(web)
    c.send(type="generate", prompt="long story", max_tokens=12)
    job_id = c.recv()["job_id"]
    seen = [c.recv() for _ in range(3)]
    c.close()
    assert [e["seq"] for e in seen] == [0, 1, 2]
    c2 = connect(web2)
    c2.send(type="resume", job_id=job_id, after=2)
    rest = c2.finish({job_id})[job_id]
    ev = seen + rest
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    assert text_of(ev) == expected_text("long story", 12, MOCK_CONFIG)


def test_events_published_before_anyone_listens_are_delivered(
        web: str, r: redis.Redis, connect: Callable[[str], Client]) -> None:
    """A job that ran to the end with nobody listening is replayed whole on resume."""
    c = connect(web)
    c.send(type="generate", prompt="nobody listens", max_tokens=5)
    job_id = c.recv()["job_id"]
    c.close()
    wait_for(lambda: r.hget(keys.job(job_id), "status") == b"done", what="the job to end")
    c2 = connect(web)
    c2.send(type="resume", job_id=job_id, after=-1)
    ev = c2.finish({job_id})[job_id]
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    assert text_of(ev) == expected_text("nobody listens", 5, MOCK_CONFIG)


def test_provider_error_ends_the_job_with_its_code(web: str, connect: Callable[[str], Client]) -> None:
    """A model the provider does not serve ends the job with error provider_404, in sequence."""
    c = connect(web)
    c.send(type="generate", prompt="hello", model="mock-2", max_tokens=3)
    job_id = c.recv()["job_id"]
    ev = c.finish({job_id})[job_id]
    assert [e["type"] for e in ev] == ["error"]
    assert ev[0]["seq"] == 0 and ev[0]["code"] == "provider_404"
