"""Processes warm up at start (Redis, scripts, encodings, provider connections), best effort."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

from app.cli.dev.redis_server import free_port
from tests.conftest import Proc, start_mock, start_web, start_worker
from workers.provider import POOLS


def test_worker_connects_every_provider_pool_before_ready(start_proc: Callable[..., Proc],
                                                          sluice_env: dict[str, str]) -> None:
    """By the time a worker says ready, each of its SDK pools has called the model once."""
    _, url = start_mock(start_proc)
    worker = start_worker(start_proc, {**sluice_env, "OPENAI_BASE_URL": url,
                                       "SLUICE_QUEUE": "warm-up", "SLUICE_METRICS_PORT": "0"},
                          "warm")
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
            stats = json.loads(resp.read())
    finally:
        worker.stop()
    assert stats["connections"] - 1 >= POOLS  # this stats request is one
    assert stats["requests"] == 0  # GET /models only: no completion was asked for


def test_front_end_starts_while_redis_is_down(start_proc: Callable[..., Proc],
                                              sluice_env: dict[str, str]) -> None:
    """With Redis unreachable the front end still comes up: /healthz answers, /readyz names Redis."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    url = start_web(start_proc, {**sluice_env, "REDIS_URL": down})  # waits for /healthz
    try:
        urllib.request.urlopen(url.replace("ws://", "http://").replace("/ws", "/readyz"),
                               timeout=10).close()
        raise AssertionError("/readyz answered 200 with Redis down")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        e.close()
        assert e.code == 503 and "redis" in body["problems"]
