"""The module ``celery -A workers.make_celery`` loads: the Celery app, built from the environment.

Example::

    celery -A workers.make_celery worker -P gevent -c 500
"""

from __future__ import annotations

from workers.celery_app import create_celery

app = create_celery()
