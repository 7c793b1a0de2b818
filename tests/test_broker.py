"""The Celery app's broker transport: kombu's Redis transport with one Redis client per channel."""

from __future__ import annotations

from app.cli.dev.redis_server import RedisServer
from tasks.config import Settings
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
