"""The module ``celery -A workers.make_celery`` loads: the Celery app, built from the environment.

Its worker processes also run the bulk pump (:mod:`workers.pump`).

Example::

    celery -A workers.make_celery worker -P gevent -c 500 -Q sluice,sluice-bulk
"""

from __future__ import annotations

from workers.celery_app import create_celery
from workers.pump import install_pump

app = create_celery()
install_pump(app)
