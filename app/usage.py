"""``GET /v1/usage``: an API key's own usage and limits, over HTTP."""

from __future__ import annotations

from dataclasses import asdict

import redis
from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app import metrics
from app.apikeys import bearer_token
from app.frontend import FrontEnd

bp = Blueprint("usage", __name__)
MAX_DAYS = 90


@bp.get("/v1/usage")
def usage() -> ResponseReturnValue:
    """The calling key's usage per UTC day (``?days=N``, default 7) and its current limits.

    Answers with the OpenAI-style ``x-ratelimit-*`` headers; 401 without a valid key.
    """
    front: FrontEnd = current_app.extensions["sluice"]
    days = request.args.get("days", "7")
    if not days.isdigit() or not 1 <= int(days) <= MAX_DAYS:
        return _error(400, "bad_field", f"'days' must be an integer within 1..{MAX_DAYS}, "
                      f"got {days!r:.20}")
    try:
        key = front.auth.authenticate(bearer_token(request.headers.get("Authorization", "")))
        if key is None:
            metrics.REQUESTS_REJECTED.labels("unauthorized").inc()
            return _error(401, "unauthorized", "send a valid API key as 'Authorization: Bearer'")
        limits = front.admission.limits(key)
        body = {"key_id": key.key_id, "name": key.name, "tier": key.tier,
                "limits": limits.as_dict(),
                "days": [asdict(d) for d in front.admission.usage(key.key_id, int(days))]}
    except redis.RedisError:
        return _error(503, "unavailable", "the gateway cannot reach Redis; retry shortly")
    return jsonify(body), 200, limits.headers()


def _error(status: int, code: str, message: str) -> ResponseReturnValue:
    return jsonify(error={"code": code, "message": message}), status
