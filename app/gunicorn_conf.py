"""gunicorn settings for Sluice's front end (``gunicorn -c python:app.gunicorn_conf``)."""

from __future__ import annotations

from typing import Any

worker_class = "gevent"
# Sockets are long-lived and mostly idle; one process holds thousands.
worker_connections = 10000
graceful_timeout = 30


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the multi-process metrics."""
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
