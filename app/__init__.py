"""The edge: the Flask app with the WebSocket endpoint and health checks."""

from __future__ import annotations

from typing import Any

from flask import Flask

from tasks.config import Settings


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the front-end app.

    Settings come from ``SLUICE_…`` environment variables, then ``test_config``
    (field names of :class:`~tasks.config.Settings`).

    Example::

        gunicorn -k gevent 'app:create_app()'
    """
    from app import batch_api, health, metrics, openai_api, page, usage, ws
    from app.frontend import FrontEnd
    from tasks.bulk import BulkEngine

    settings = Settings.from_env(**(test_config or {}))
    app = Flask(__name__)
    app.config.from_mapping(
        SOCK_SERVER_OPTIONS={"ping_interval": settings.ws_ping_interval_s or None,
                             "max_message_size": settings.max_frame_bytes},
    )
    front = app.extensions["sluice"] = FrontEnd.build(settings)
    app.extensions["sluice_bulk"] = BulkEngine(front.redis, settings, front.admission,
                                               front.jobs, front.events)
    front.warm()
    ws.sock.init_app(app)
    app.register_blueprint(ws.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(usage.bp)
    app.register_blueprint(page.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(batch_api.bp)
    return app
