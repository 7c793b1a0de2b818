"""Liveness and readiness endpoints."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from tasks.consumers import QueueConsumers, unserved

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)
_warned: set[str] = set()


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """The process is up."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Redis and the broker answer; 503 naming what does not.

    Models whose Celery queue no worker consumes (per the workers'
    heartbeats) are listed under ``queues_without_workers`` and logged once:
    their jobs wait, the rest of the gateway serves.
    """
    front = current_app.extensions["sluice"]
    problems = front.ready()
    if problems:
        return jsonify(status="unavailable", problems=problems), 503
    admission = front.admission
    queues = {m: admission.queues.get(m, admission.queue)
              for m in {*front.settings.model_names, *admission.queues}}
    try:
        gaps = unserved(queues, QueueConsumers(front.redis).live())
    except redis.RedisError as e:
        return jsonify(status="unavailable", problems={"redis": str(e)}), 503
    for queue, models in gaps.items():
        if queue not in _warned:
            _warned.add(queue)
            log.warning("no worker consumes queue %r: jobs for %s wait there", queue,
                        ", ".join(models))
    if gaps:
        return jsonify(status="ok", queues_without_workers=gaps)
    return jsonify(status="ok")
