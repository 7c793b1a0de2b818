"""Liveness and readiness endpoints."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """The process is up."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Redis and the broker answer; 503 naming what does not."""
    problems = current_app.extensions["sluice"].ready()
    if problems:
        return jsonify(status="unavailable", problems=problems), 503
    return jsonify(status="ok")
