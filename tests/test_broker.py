"""The Celery app's broker side: one Redis client per channel, a control channel that reconnects."""

from __future__ import annotations

from collections.abc import Callable

import redis

from app.cli.dev.redis_server import RedisServer
from tasks.config import Settings
from tasks.queue import make_celery
from tests.conftest import Proc, start_worker, wait_for
from workers.celery_app import create_celery


def test_broker_channel_reuses_one_redis_client(redis_server: RedisServer) -> None:
    """Consecutive broker operations (publish, ack, QoS) on a channel share one Redis client."""
    app = create_celery(Settings(redis_url=redis_server.url))
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
                assert first.ping()
    finally:
        app.close()


def test_broker_url_keeps_its_scheme(redis_server: RedisServer) -> None:
    """The broker connection still reads as redis:// (Flower picks its broker client by it)."""
    app = create_celery(Settings(redis_url=redis_server.url))
    try:
        with app.connection_for_write() as conn:
            assert conn.as_uri().startswith("redis://")
    finally:
        app.close()


def test_worker_answers_control_commands_after_losing_its_pubsub_connection(
        start_proc: Callable[..., Proc], sluice_env: dict[str, str], r: redis.Redis) -> None:
    """Redis drops every pub/sub connection: the worker answers pings (Flower, inspect) again."""
    worker = start_worker(start_proc, {**sluice_env, "SLUICE_QUEUE": "control",
                                       "SLUICE_METRICS_PORT": "0"}, "control")
    celery = make_celery(Settings.from_env(sluice_env))

    def answers() -> bool:
        return any(name.startswith("control-") for reply in celery.control.ping(timeout=1)
                   for name in reply)
    try:
        wait_for(answers, 20, "the worker to answer a ping")
        assert r.client_kill_filter(_type="pubsub") >= 1
        wait_for(answers, 20, "the worker to answer a ping after the kill")
    finally:
        celery.close()
        worker.stop()
