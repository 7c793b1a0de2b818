"""The browser side: the page at ``GET /``, its static files, and ``GET /v1/status``.

The page (``app/static/index.html``, ``page.js``, ``sluice.css``) and the
browser client it is built on (``app/static/sluice.js``) are plain files, no
build step; Flask serves them from ``/static/``.  They load nothing from
elsewhere, and the Content-Security-Policy says so.
"""

from __future__ import annotations

from pathlib import Path

import redis
from flask import Blueprint, Response, current_app, jsonify, request, send_from_directory
from flask.typing import ResponseReturnValue

from app import metrics
from app.apikeys import bearer_token
from app.frontend import FrontEnd
from app.status import StatusBoard

bp = Blueprint("page", __name__)
STATIC = Path(__file__).resolve().parent / "static"


@bp.get("/")
def index() -> Response:
    """The chat, bulk and status page."""
    return send_from_directory(STATIC, "index.html")


@bp.after_app_request
def page_headers(response: Response) -> Response:
    """Lock the page and its files to this origin: the API key lives in the page."""
    if request.endpoint in ("page.index", "static"):
        host = request.host
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/v1/status")
def status() -> ResponseReturnValue:
    """Aggregate figures of the gateway for any valid key (``Authorization: Bearer``).

    Open sockets and TTFT/TPOT are this front end's; jobs running, queue depth
    and workers online are the whole gateway's.  Served from a snapshot at most
    ``cache_s`` old (see :mod:`app.status`).
    """
    front: FrontEnd = current_app.extensions["sluice"]
    try:
        key = front.auth.authenticate(bearer_token(request.headers.get("Authorization", "")))
    except redis.RedisError:
        return _error(503, "unavailable", "the gateway cannot reach Redis; retry shortly")
    if key is None:
        metrics.REQUESTS_REJECTED.labels("unauthorized").inc()
        return _error(401, "unauthorized", "send a valid API key as 'Authorization: Bearer'")
    board = current_app.extensions.get("sluice_status")
    if board is None:
        board = current_app.extensions["sluice_status"] = StatusBoard(
            front.redis, front.celery, queue=front.settings.queue)
    return jsonify(board.snapshot()), 200, {"Cache-Control": "no-store"}


def _error(status: int, code: str, message: str) -> ResponseReturnValue:
    return jsonify(error={"code": code, "message": message}), status
