"""The worker edge: the Celery app, the provider client, housekeeping and worker metrics.

Importing this package builds nothing; ``celery -A workers.make_celery``
loads the app (see :mod:`workers.make_celery`).
"""
