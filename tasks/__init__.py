"""The job lifecycle: what a job is, its event log, and the Celery task that runs it."""
