"""Many jobs per broker message: a burst of submits shares messages, and each job still runs,
re-runs and ends on its own.

Each test submits its burst with no worker consuming its queue, reads the messages the front
end pushed (so it knows which jobs share one), then starts the workers.
"""

from __future__ import annotations

import base64
import json
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tests.conftest import MOCK, Client, Proc, start_mock, start_web, start_worker, text_of

#: Sockets that each send one ``generate`` at once (a socket serves its frames in order).
BURST = 24
SLOW = {"ttft_ms": 50, "itl_ms": 50, "output_tokens": 200}


def _queue_env(sluice_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**sluice_env, "SLUICE_QUEUE": "batchstart-" + uuid.uuid4().hex[:8],
            "SLUICE_METRICS_PORT": "0", **extra}


def _burst(clients: list[Client], prompt: str, max_tokens: int) -> list[str]:
    """One ``generate`` from every client at once; the job ids, in client order."""
    for i, c in enumerate(clients):
        c.send(type="generate", ref=i, prompt=f"{prompt} {i}", max_tokens=max_tokens)
    ids = []
    for c in clients:
        frame = c.until(lambda f: f.get("type") in ("queued", "error"))
        assert frame["type"] == "queued", frame
        ids.append(frame["job_id"])
    return ids


def _messages(r: redis.Redis, queue: str) -> list[list[str]]:
    """The job ids of every message waiting on ``queue``, oldest first."""
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == "sluice.generate"
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {}
        out.append(args)
    return out


def _ends(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events if e["type"] in ("done", "error")]


def test_burst_shares_broker_messages_and_every_job_ends_done(
        start_proc: Callable[..., Proc], sluice_env: dict[str, str], r: redis.Redis,
        connect: Callable[..., Client]) -> None:
    """A burst of N generate frames: fewer than N broker messages naming each job once; all end done with the exact text."""
    env = _queue_env(sluice_env)
    queue = env["SLUICE_QUEUE"]
    web = start_web(start_proc, env)
    clients = [connect(web) for _ in range(BURST)]
    ids = _burst(clients, "burst", 8)
    messages = _messages(r, queue)
    named = [job_id for m in messages for job_id in m]
    assert sorted(named) == sorted(ids), "every job named once, in one message"
    assert len(messages) < BURST, f"{len(messages)} messages for {BURST} jobs"
    assert any(len(m) > 1 for m in messages)

    worker = start_worker(start_proc, env, "batch")
    try:
        for i, (c, job_id) in enumerate(zip(clients, ids, strict=True)):
            ev = c.finish({job_id})[job_id]
            assert _ends(ev) == ["done"], ev[-1]
            assert [e["seq"] for e in ev] == list(range(len(ev)))
            assert text_of(ev) == expected_text(f"burst {i}", 8, MockConfig(**MOCK))  # type: ignore[arg-type]
        assert r.llen(queue) == 0
    finally:
        worker.stop()
    received = sum("Task sluice.generate[" in line and "] received" in line
                   for line in worker.log().splitlines())
    assert 0 < received < BURST, "the worker received fewer tasks than jobs"


@pytest.fixture(scope="module")
def slow_mock(start_proc: Callable[..., Proc]) -> str:
    return start_mock(start_proc, **SLOW)[1]


def test_killed_worker_holding_a_message_of_many_jobs_ends_each_exactly_once(
        start_proc: Callable[..., Proc], sluice_env: dict[str, str], slow_mock: str,
        r: redis.Redis, connect: Callable[..., Client]) -> None:
    """kill -9 of the worker streaming a multi-job message: each job restarts and ends once, whole."""
    # The jobs wait for a worker that starts only now: a re-send of them (after
    # the unstarted grace, on a slow box) would be right, but is not this test's.
    env = _queue_env(sluice_env, OPENAI_BASE_URL=slow_mock, SLUICE_UNSTARTED_GRACE_S="60")
    web = start_web(start_proc, env)
    clients = [connect(web) for _ in range(BURST)]
    ids = _burst(clients, "survive", 40)
    messages = _messages(r, queue := env["SLUICE_QUEUE"])
    assert sorted(j for m in messages for j in m) == sorted(ids)
    shared = max(messages, key=len)
    assert len(shared) > 1, "no message carried several jobs"

    victim = start_worker(start_proc, env, "victim")
    # Every job streams on the victim (the only worker): each client sees a token.
    for c in clients:
        c.until(lambda f: f.get("type") == "token")
    assert r.llen(queue) == 0
    victim.kill(signal.SIGKILL)
    victim.popen.wait()
    rescuer = start_worker(start_proc, env, "rescuer")
    try:
        for i, (c, job_id) in enumerate(zip(clients, ids, strict=True)):
            ev = c.finish({job_id})[job_id]
            assert _ends(ev) == ["done"], f"job {job_id}: {_ends(ev)}"
            assert [e["seq"] for e in ev] == list(range(len(ev)))
            assert [e["type"] for e in ev].count("restart") == 1
            assert text_of(ev) == expected_text(f"survive {i}", 40, MockConfig(**SLOW))  # type: ignore[arg-type]
            assert ev[-1]["metrics"]["attempts"] == 2
            assert r.hget(keys.job(job_id), "status") == b"done"
    finally:
        rescuer.stop()
        victim.stop()


def test_jobs_admitted_in_their_creation_call_are_stored_only_when_admitted(
        start_proc: Callable[..., Proc], sluice_env: dict[str, str], r: redis.Redis,
        connect: Callable[..., Client]) -> None:
    """A burst from one key that may run one job at a time: admission, storage and the
    message are one call per batch; the refused jobs leave no record, reservation or
    slot, a message naming none admitted is never pushed, and the admitted job runs."""
    env = _queue_env(sluice_env)
    queue = env["SLUICE_QUEUE"]
    web = start_web(start_proc, env)
    key, info = KeyStore(r).create("one-at-a-time", "tiny")
    key_id = info.key_id
    clients = [connect(web, key) for _ in range(BURST)]
    for i, c in enumerate(clients):
        c.send(type="generate", ref=i, prompt=f"one at a time {i}", max_tokens=8)
    answers = [c.until(lambda f: f.get("type") in ("queued", "error")) for c in clients]
    queued = [a for a in answers if a["type"] == "queued"]
    assert len(queued) == 1, answers
    assert {a["code"] for a in answers if a["type"] == "error"} == {"concurrency_limit"}
    admitted = queued[0]["job_id"]
    messages = _messages(r, queue)
    assert len(messages) == 1 and admitted in messages[0], messages
    for job_id in messages[0]:
        if job_id != admitted:  # refused in the same call: named, but nothing of it stored
            assert not r.exists(keys.job(job_id), keys.reservation(job_id))
    assert r.zrange(keys.slots(key_id), 0, -1) == [admitted.encode()]

    worker = start_worker(start_proc, env, "admit")
    try:
        owner = clients[answers.index(queued[0])]
        ev = owner.finish({admitted})[admitted]
        assert _ends(ev) == ["done"], ev[-1]
        assert r.zcard(keys.slots(key_id)) == 0
        assert r.llen(queue) == 0
    finally:
        worker.stop()
    assert "Traceback" not in worker.log()
