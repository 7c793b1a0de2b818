"""The pipeline with RabbitMQ as the Celery broker; Redis keeps event logs, jobs and limits.

Runs the end-to-end pipeline tests of ``test_pipeline.py`` again on a stack
whose workers and front ends use an AMQP broker, plus the failures that
broker handles its own way: a worker killed mid-stream (RabbitMQ hands its
unacked message straight back) and a message lost before any worker leased
its job.  Needs a RabbitMQ (``SLUICE_TEST_AMQP_URL``, default the local one);
skipped with the reason when none answers.

The stack's mock waits 300 ms before its first token (the session's waits
40 ms): on RabbitMQ the front end publishes each job's message itself before
it answers ``queued``, and on a busy 2-core machine ten such publishes in a
row can outlast a 130 ms job, which would fail the ordering test for a reason
that is not the order.  Every other expectation is the same.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import redis
from kombu import Connection

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tests.conftest import (
    MOCK,
    Client,
    Proc,
    start_mock,
    start_web,
    start_worker,
    text_of,
    wait_for,
)

# The pipeline tests, collected again here: the fixtures below replace the
# session's Redis-broker stack for them.
from tests.test_pipeline import (  # noqa: F401
    test_events_published_before_anyone_listens_are_delivered,
    test_one_job_streams_queued_then_contiguous_tokens,
    test_provider_error_ends_the_job_with_its_code,
    test_resume_on_another_front_end_after_disconnect,
    test_ten_jobs_back_to_back_are_all_acknowledged_first,
    test_two_hundred_sockets_against_one_worker,
)

SLOW = {"ttft_ms": 50, "itl_ms": 60, "output_tokens": 40}
SLOW_CONFIG = MockConfig(**SLOW)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pipeline_env(start_proc: Callable[..., Proc], amqp_env: dict[str, str]) -> dict[str, str]:
    """The amqp stack with the pipeline tests' mock, only slower to its first token."""
    _, url = start_mock(start_proc, **{**MOCK, "ttft_ms": 300})
    return {**amqp_env, "OPENAI_BASE_URL": url}


@pytest.fixture(scope="module")
def worker(start_proc: Callable[..., Proc], pipeline_env: dict[str, str]) -> Iterator[Proc]:
    proc = start_worker(start_proc, pipeline_env, "amqp")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def web(start_proc: Callable[..., Proc], pipeline_env: dict[str, str], worker: Proc) -> str:
    return start_web(start_proc, pipeline_env)


@pytest.fixture(scope="module")
def web2(start_proc: Callable[..., Proc], pipeline_env: dict[str, str], worker: Proc) -> str:
    return start_web(start_proc, pipeline_env)


@pytest.fixture(scope="module")
def slow_env(start_proc: Callable[..., Proc], amqp_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A slow model and a queue of their own, for tests that start their own workers."""
    _, url = start_mock(start_proc, **SLOW)
    queue = amqp_env["SLUICE_QUEUE"] + "-slow"
    yield {**amqp_env, "OPENAI_BASE_URL": url,
           "SLUICE_WORKER_CONCURRENCY": "20", "SLUICE_QUEUE": queue}
    with Connection(amqp_env["SLUICE_BROKER_URL"], connect_timeout=3) as conn:
        conn.default_channel.queue_delete(queue)


@pytest.fixture(scope="module")
def slow_web(start_proc: Callable[..., Proc], slow_env: dict[str, str]) -> str:
    return start_web(start_proc, slow_env)


def test_killed_worker_job_finishes_on_another(start_proc: Callable[..., Proc],
                                               slow_env: dict[str, str], slow_web: str,
                                               r: redis.Redis,
                                               connect: Callable[..., Client]) -> None:
    """kill -9 mid-stream on amqp: redelivered copies do nothing, the reaper re-runs the job: restart, whole text, slot freed."""
    first = start_worker(start_proc, slow_env, "doomed")
    c = connect(slow_web, key=KeyStore(r).create("crash", "tiny")[0])
    c.send(type="generate", prompt="survive a crash", max_tokens=30)
    job_id = c.recv()["job_id"]
    for _ in range(5):
        assert c.recv()["type"] == "token"
    first.kill(signal.SIGKILL)
    first.popen.wait()
    second = start_worker(start_proc, slow_env, "heir")
    try:
        ev = c.finish({job_id})[job_id]
    finally:
        second.stop()
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    kinds = [e["type"] for e in ev]
    assert "restart" in kinds and kinds[-1] == "done", kinds
    assert text_of(ev) == expected_text("survive a crash", 30, SLOW_CONFIG), json.dumps(ev)
    # One attempt per restart after the first (a slow machine may fence off a re-run too).
    assert ev[-1]["metrics"]["attempts"] == kinds.count("restart") + 1

    def admitted_again() -> bool:
        c.send(type="generate", ref="next", prompt="after the crash", max_tokens=1)
        return c.until(lambda f: f.get("ref") == "next")["type"] == "queued"
    wait_for(admitted_again, 5, "the concurrency slot to be released")


def test_job_whose_message_was_lost_is_sent_again(start_proc: Callable[..., Proc],
                                                  slow_env: dict[str, str], slow_web: str,
                                                  r: redis.Redis,
                                                  connect: Callable[..., Client]) -> None:
    """A message taken and acked by a consumer that then died: the reaper sends the job again through RabbitMQ."""
    c = connect(slow_web)
    c.send(type="generate", prompt="lost on amqp", max_tokens=5)
    job_id = c.recv()["job_id"]
    taker = ("import os\nfrom kombu import Connection\n"
             f"with Connection({slow_env['SLUICE_BROKER_URL']!r}) as conn:\n"
             f"    conn.SimpleQueue({slow_env['SLUICE_QUEUE']!r}).get(timeout=10).ack()\n"
             "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", taker], check=True, timeout=30)
    assert r.hget(keys.job(job_id), "status") == b"queued"
    assert r.zscore(keys.UNSTARTED, job_id) is not None
    worker = start_worker(start_proc, {**slow_env, "SLUICE_UNSTARTED_GRACE_S": "1"}, "resend")
    try:
        ev = c.finish({job_id})[job_id]
    finally:
        worker.stop()
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    assert ev[-1]["type"] == "done" and ev[-1]["metrics"]["attempts"] == 1
    assert text_of(ev) == expected_text("lost on amqp", 5, SLOW_CONFIG)
    assert r.zscore(keys.UNSTARTED, job_id) is None
