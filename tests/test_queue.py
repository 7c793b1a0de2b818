"""The generation task's broker message, as the front end pushes it from the job-creation script."""

from __future__ import annotations

import uuid

import redis

from app.cli.dev.redis_server import RedisServer
from app.frontend import FrontEnd
from tasks.config import Settings
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
