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


def test_other_brokers_keep_kombus_transport() -> None:
    """An AMQP or TLS Redis broker URL keeps the transport kombu picks for its scheme."""
    for url, transport in (("amqp://guest@127.0.0.1:1//", "amqp"),
                           ("rediss://127.0.0.1:1/0", "rediss")):
        app = create_celery(Settings(broker_url=url))
        try:
            assert app.connection_for_write().transport_cls == transport
        finally:
            app.close()
