"""The generation task's broker message, as the front end pushes it from the job-creation script."""

from __future__ import annotations

import functools
import signal
import threading
import uuid
from typing import Any

import pytest
import redis

from app.cli.dev.redis_server import RedisServer
from app.frontend import FrontEnd
from tasks import keys
from tasks.config import Settings
from tasks.events import EventLog
from tasks.jobs import JobSpec, JobStore
from tasks.queue import TASK_NAME, TaskMessages, make_celery

#: Fields that are new per message (ids and tags); everything else must match.
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag"}


def test_pushed_message_decodes_like_send_tasks(redis_server: RedisServer) -> None:
    """kombu decodes the message CREATE pushes exactly like send_task's, ids and tags aside."""
    queue = "render-" + uuid.uuid4().hex[:8]
    celery = make_celery(Settings(redis_url=redis_server.url))
    job_id = uuid.uuid4().hex
    try:
        celery.send_task(TASK_NAME, args=[job_id], queue=queue)
        with redis.Redis.from_url(redis_server.url) as r:
            JobStore(r, 60).create(JobSpec(model="mock-1", messages=[], max_tokens=1, queue=queue),
                                   job_id, message=TaskMessages(celery).render(job_id, queue))
        with celery.connection_for_read() as conn:
            channel = conn.default_channel
            sent = channel.basic_get(queue, no_ack=True)  # both LPUSHed; read from the tail
            ours = channel.basic_get(queue, no_ack=True)
    finally:
        celery.close()
    assert sent is not None and ours is not None
    assert ours.decode() == sent.decode() == [[job_id], {}, {
        "callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert ours.content_type == sent.content_type
    assert ours.content_encoding == sent.content_encoding
    assert ours.headers["task"] == TASK_NAME

    def fixed(fields: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in fields.items() if k not in PER_MESSAGE}
    assert fixed(ours.headers) == fixed(sent.headers)
    assert fixed(ours.properties) == fixed(sent.properties)
    assert ours.delivery_info == sent.delivery_info
    assert ours.headers["id"] == ours.headers["root_id"] == ours.properties["correlation_id"]


def test_front_end_enqueues_through_celery_unless_the_broker_is_its_redis() -> None:
    """With the broker on another server (AMQP, another Redis) submits go through send_task."""
    redis_url = "redis://127.0.0.1:1/0"
    assert FrontEnd.build(Settings(redis_url=redis_url)).intake.messages is not None
    for broker in ("amqp://guest@127.0.0.1:1//", "redis://127.0.0.1:2/0"):
        front = FrontEnd.build(Settings(redis_url=redis_url, broker_url=broker))
        assert front.intake.messages is None, broker


def test_unstarted_index_resends_with_back_off_and_forgets_started_and_ended_jobs(
        r: redis.Redis) -> None:
    """A job sent and never started is claimed for a re-send, then not again until it has waited as long again; START and the job's end take it out, a vanished job is dropped."""
    jobs = JobStore(r, 60)
    events = EventLog(r, 60)
    queue = "unstarted-" + uuid.uuid4().hex[:8]
    spec = JobSpec(model="mock-1", messages=[], max_tokens=1, queue=queue)
    waiting, started, ended, vanished = (jobs.create(spec)[0] for _ in range(4))

    def mine(claimed: list[tuple[str, str]]) -> list[tuple[str, str]]:
        # The session's Redis may hold other tests' unstarted jobs.
        return [c for c in claimed if c[1] == queue]
    try:
        assert {j for j in (waiting, started, ended, vanished)
                if r.zscore(keys.UNSTARTED, j) is not None} == {waiting, started, ended, vanished}
        assert jobs.start(started, "token", 10_000).outcome == "started"
        events.append(ended, "error", {"code": "unavailable", "message": "x"}, status="error")
        r.delete(keys.job(vanished))
        assert r.zscore(keys.UNSTARTED, started) is None
        assert r.zscore(keys.UNSTARTED, ended) is None
        # Pretend the job has waited 10 s: its next claim comes 10 s later, not one grace later.
        r.hset(keys.job(waiting), "queued_ms", int(r.zscore(keys.UNSTARTED, waiting) or 0) - 10_000)
        assert mine(jobs.claim_unstarted(grace_ms=0)) == [(waiting, queue)]
        assert r.zscore(keys.UNSTARTED, vanished) is None
        assert mine(jobs.claim_unstarted(grace_ms=0)) == [], "claimed again before its back-off"
        # A re-send through the dispatcher's path starts the wait afresh.
        assert jobs.track_unstarted(waiting)
        assert mine(jobs.claim_unstarted(grace_ms=0)) == [(waiting, queue)]
        assert not jobs.track_unstarted(vanished)
        assert r.zscore(keys.UNSTARTED, vanished) is None
    finally:
        r.zrem(keys.UNSTARTED, waiting, started, ended, vanished)
        r.delete(*(keys.job(j) for j in (waiting, started, ended, vanished)))


def test_redis_client_times_out_a_stalled_reply_but_not_an_idle_subscription() -> None:
    """A Redis that stops answering fails a command after redis_socket_timeout_s; a subscription idle for longer keeps listening."""
    settings_of = functools.partial(Settings, redis_socket_timeout_s=0.5)
    with RedisServer() as server:
        client = settings_of(redis_url=server.url).redis_client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe("idle")
            received: list[Any] = []
            listener = threading.Thread(target=lambda: received.append(next(pubsub.listen())))
            listener.start()
            listener.join(1.5)  # three timeouts' worth of silence
            assert listener.is_alive() and not received
            client.publish("idle", "hello")
            listener.join(10)
            assert received and received[0]["data"] == b"hello"
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(redis.TimeoutError):
                    client.ping()
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert client.ping()
        finally:
            pubsub.close()
            client.close()


@pytest.mark.parametrize("n", [2, 5, 32])
def test_message_of_several_jobs_decodes_like_send_tasks(redis_server: RedisServer, n: int
                                                         ) -> None:
    """A message naming N jobs (CREATE_MANY pushes it) decodes like send_task(args=[id1, …, idN])'s."""
    queue = "render-" + uuid.uuid4().hex[:8]
    celery = make_celery(Settings(redis_url=redis_server.url))
    job_ids = [uuid.uuid4().hex for _ in range(n)]
    spec = JobSpec(model="mock-1", messages=[], max_tokens=1, queue=queue)
    try:
        celery.send_task(TASK_NAME, args=job_ids, queue=queue)
        with redis.Redis.from_url(redis_server.url) as r:
            jobs = JobStore(r, 60)
            waiting = jobs.create_many([(j, spec) for j in job_ids],
                                       TaskMessages(celery).render(job_ids, queue))
            assert waiting == 1, "send_task's message was waiting"
            assert [jobs.status(j) for j in job_ids] == ["queued"] * n
            assert all(r.zscore(keys.UNSTARTED, j) is not None for j in job_ids)
            r.zrem(keys.UNSTARTED, *job_ids)
        with celery.connection_for_read() as conn:
            channel = conn.default_channel
            sent = channel.basic_get(queue, no_ack=True)
            ours = channel.basic_get(queue, no_ack=True)
            assert channel.basic_get(queue, no_ack=True) is None, "one message for all the jobs"
    finally:
        celery.close()
    assert sent is not None and ours is not None
    assert ours.decode() == sent.decode() == [job_ids, {}, {
        "callbacks": None, "errbacks": None, "chain": None, "chord": None}]

    def fixed(fields: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in fields.items() if k not in PER_MESSAGE}
    assert fixed(ours.headers) == fixed(sent.headers)
    assert fixed(ours.properties) == fixed(sent.properties)
    assert ours.delivery_info == sent.delivery_info
