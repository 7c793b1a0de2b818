"""gunicorn settings for Sluice's front end (``gunicorn -c python:app.gunicorn_conf``).

On SIGTERM gunicorn's gevent worker stops accepting and waits up to
``graceful_timeout`` for its requests to end — but a WebSocket never ends by
itself, so clients would stream on and then be dropped with 1006.  Instead
every socket is told at once which jobs to resume and closed with 1001
(:meth:`app.sockets.Sockets.shutdown`); the worker then exits within a second
or two.
"""

from __future__ import annotations

from typing import Any

worker_class = "gevent"
# Sockets are long-lived and mostly idle; one process holds thousands.
worker_connections = 10000
graceful_timeout = 30
#: How long a quick shutdown (SIGINT, SIGQUIT) waits for sockets to take their last frame.
QUICK_SHUTDOWN_S = 1.0


def post_fork(server: Any, worker: Any) -> None:
    """Spawn greenlets without recording where they were spawned from.

    gevent's default keeps, per greenlet, its spawner, the spawner's tree locals
    and a summary of the spawning stack (about 2 KiB); a front end spawns
    three greenlets per socket and uses none of it (see "Memory" in README.rst).
    """
    import gevent

    gevent.config.track_greenlet_tree = False


def post_worker_init(worker: Any) -> None:
    """Close every socket with a ``reconnect`` frame and 1001 as soon as SIGTERM arrives."""
    import signal

    import gevent

    sockets = worker.wsgi.extensions["sluice"].sockets
    stop_worker = signal.getsignal(signal.SIGTERM)  # gunicorn's: stop accepting, drain

    def on_sigterm(signum: int, frame: Any) -> None:
        # Blocking is not allowed in a signal handler; the closing is not blocking
        # anyway, but it runs in its own greenlet like gunicorn's own handlers.
        gevent.spawn(sockets.shutdown)
        if callable(stop_worker):
            stop_worker(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_int(worker: Any) -> None:
    """A quick shutdown still tells every client where to resume, for a moment."""
    sockets = worker.wsgi.extensions["sluice"].sockets
    sockets.shutdown(wait_s=QUICK_SHUTDOWN_S)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the multi-process metrics."""
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
