"""The Celery app, its configuration and the provider clients.

``celery -A workers worker`` loads :data:`app`, built from the environment.
"""

from __future__ import annotations

from workers.celery_app import create_celery

app = create_celery()
