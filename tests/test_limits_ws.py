"""Keys and token-aware limits as clients see them, over real sockets and HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import redis
import websocket

from app.apikeys import KeyStore
from tasks.tokens import count_message_tokens
from tests.conftest import Client, wait_for


@pytest.fixture
def tiny_key(r: redis.Redis) -> str:
    """A fresh key of the 'tiny' tier: 600 tokens/min, one job at a time, mock-1 only."""
    return KeyStore(r).create("tiny-user", "tiny")[0]


def _close_code(ws: websocket.WebSocket) -> int:
    opcode, frame = ws.recv_data_frame(control_frame=True)
    while opcode != websocket.ABNF.OPCODE_CLOSE:
        opcode, frame = ws.recv_data_frame(control_frame=True)
    return int.from_bytes(frame.data[:2], "big")


def _http(url: str, key: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), json.loads(e.read())


def test_no_key_then_generate_gets_unauthorized_and_close_4401(web: str) -> None:
    """A socket without a key must authenticate first; a generate gets 'unauthorized', close 4401."""
    ws = websocket.create_connection(web, timeout=10)
    try:
        ws.send(json.dumps({"type": "generate", "ref": 1, "prompt": "hi"}))
        err = json.loads(ws.recv())
        assert err["code"] == "unauthorized" and err["ref"] == 1
        assert _close_code(ws) == 4401
    finally:
        ws.shutdown()


@pytest.mark.parametrize("key", ["sk-sluice-not-a-real-key", "Bearer-garbage"])
def test_bad_key_on_handshake_is_http_401(web: str, key: str) -> None:
    """A bad key in the Authorization header is refused with HTTP 401 before the upgrade."""
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(web, timeout=10, header=[f"Authorization: Bearer {key}"])
    assert e.value.status_code == 401


def test_revoked_key_is_refused(web: str, r: redis.Redis) -> None:
    """A key that worked stops working once revoked."""
    store = KeyStore(r)
    raw, info = store.create("short-lived", "free")
    Client(web, raw).close()
    store.revoke(info.key_id)
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(web, timeout=10, header=[f"Authorization: Bearer {raw}"])
    assert e.value.status_code == 401


def test_auth_frame_authenticates_a_browser_socket(web: str, api_key: str,
                                                    connect: Callable[..., Client]) -> None:
    """A socket without a header sends 'auth' first, then works like any other."""
    c = connect(web, key=None)
    c.send(type="auth", ref="a", key=api_key)
    ok = c.recv()
    assert ok["type"] == "authenticated" and ok["tier"] == "unlimited"
    c.send(type="generate", prompt="from a browser", max_tokens=3)
    job_id = c.recv()["job_id"]
    assert c.finish({job_id})[job_id][-1]["type"] == "done"


def test_bad_auth_frame_closes_with_4401(web: str) -> None:
    """An 'auth' frame with a bad key gets 'unauthorized' and the socket closes with 4401."""
    ws = websocket.create_connection(web, timeout=10)
    try:
        ws.send(json.dumps({"type": "auth", "key": "sk-sluice-wrong"}))
        assert json.loads(ws.recv())["code"] == "unauthorized"
        assert _close_code(ws) == 4401
    finally:
        ws.shutdown()


def test_queued_carries_limits(web: str, tiny_key: str, connect: Callable[..., Client]) -> None:
    """An admitted job's queued frame reports the key's remaining tokens and requests."""
    c = connect(web, key=tiny_key)
    c.send(type="generate", prompt="hello", max_tokens=10)
    q = c.recv()
    assert q["type"] == "queued"
    need = count_message_tokens([{"role": "user", "content": "hello"}]) + 10
    assert q["limits"] == {"limit_tokens": 600, "remaining_tokens": 600 - need,
                           "reset_tokens_s": pytest.approx(need / 10, abs=0.002),
                           "limit_requests": 1000, "remaining_requests": 999,
                           "reset_requests_s": pytest.approx(0.06, abs=0.002),
                           "limit_concurrent_jobs": 1, "active_jobs": 1}
    c.finish({q["job_id"]})


LONG_PROMPT_TOKENS = count_message_tokens([{"role": "user", "content": "word " * 150}])


@pytest.mark.parametrize(("frame", "code", "message"), [
    ({"model": "mock-2"}, "model_not_allowed",
     "model 'mock-2' is not available to the 'tiny' tier; allowed: mock-1"),
    ({"max_tokens": 65}, "too_large", "max_tokens 65 exceeds the 'tiny' tier's limit of 64"),
    ({"prompt": "word " * 150}, "too_large",
     f"the prompt has {LONG_PROMPT_TOKENS} tokens; the 'tiny' tier allows 100"),
])
def test_refusals_before_any_job(web: str, tiny_key: str, connect: Callable[..., Client],
                                 r: redis.Redis, frame: dict[str, Any], code: str,
                                 message: str) -> None:
    """A request the tier cannot serve is refused with its code and never becomes a job."""
    c = connect(web, key=tiny_key)
    jobs_before = len(r.keys("sluice:job:*:log")) + len(r.keys("sluice:job:????????????????????????????????"))
    c.send(type="generate", ref="x", **{"prompt": "hi", **frame})
    err = c.recv()
    assert err == {"type": "error", "ref": "x", "code": code, "message": message}
    assert len(r.keys("sluice:job:*:log")) + len(r.keys("sluice:job:????????????????????????????????")) == jobs_before


def test_rate_limited_with_retry_after_from_the_bucket(web: str, r: redis.Redis,
                                                       connect: Callable[..., Client]) -> None:
    """Past the bucket, a request gets rate_limited with a retry_after computed from the refill."""
    c = connect(web, key=KeyStore(r).create("thin-user", "thin")[0])
    c.send(type="generate", prompt="first", max_tokens=64)
    first = c.recv()
    assert first["type"] == "queued"
    c.finish({first["job_id"]})  # ends, and gives its unused reservation back
    # Drain the bucket: each request reserves its prompt plus 64 output tokens.
    refusal = None
    for i in range(20):
        c.send(type="generate", ref=i, prompt="a b c d e f g h", max_tokens=64, session="s")
        f = c.until(lambda f: f.get("type") in ("queued", "error") and "seq" not in f)
        if f["type"] == "error":
            refusal = f
            break
    assert refusal is not None and refusal["code"] == "rate_limited", refusal
    # 600 tokens per minute refill at 10 per second: the wait is the deficit / 10.
    assert 0 < refusal["retry_after"] <= 8
    assert refusal["limits"]["remaining_tokens"] < 80


def test_concurrency_cap_releases_when_the_job_ends(web: str, tiny_key: str,
                                                    connect: Callable[..., Client]) -> None:
    """The tier's one-job cap refuses a second job while the first runs, then frees up."""
    c = connect(web, key=tiny_key)
    c.send(type="generate", prompt="one", max_tokens=12)
    first = c.recv()["job_id"]
    c.send(type="generate", ref="two", prompt="two", max_tokens=4)
    assert c.until(lambda f: f.get("ref") == "two")["code"] == "concurrency_limit"
    c.finish({first})

    def admitted_again() -> bool:
        c.send(type="generate", ref="three", prompt="three", max_tokens=4)
        return c.until(lambda f: f.get("ref") == "three")["type"] == "queued"
    wait_for(admitted_again, 5, "the slot to be released")


def test_usage_endpoint_reports_own_usage_with_headers(web: str, tiny_key: str,
                                                       connect: Callable[..., Client]) -> None:
    """GET /v1/usage shows the key's own requests and tokens, with x-ratelimit headers; 401 without a key."""
    c = connect(web, key=tiny_key)
    c.send(type="generate", prompt="count me", max_tokens=5)
    job_id = c.recv()["job_id"]
    done = c.finish({job_id})[job_id][-1]
    url = web.replace("ws://", "http://").replace("/ws", "/v1/usage")
    # The done event and the settlement are one Redis call: no wait.
    status, headers, body = _http(url, tiny_key)
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "600"
    assert body["tier"] == "tiny"
    assert body["days"][0] == {"day": body["days"][0]["day"], "requests": 1, "rejected": 0,
                               "prompt_tokens": done["usage"]["prompt_tokens"],
                               "completion_tokens": 5}
    assert _http(url, None)[0] == 401
    assert _http(url + "?days=-3", tiny_key)[0] == 400


def test_light_user_not_blocked_while_heavy_user_is(web: str, r: redis.Redis,
                                                     connect: Callable[..., Client]) -> None:
    """Many tiny prompts of one key pass while another key's huge requests are refused."""
    store = KeyStore(r)
    light = connect(web, key=store.create("light", "thin")[0])
    heavy = connect(web, key=store.create("heavy", "thin")[0])
    refused = []
    for i in range(6):  # ~150 tokens each against 600 per minute
        heavy.send(type="generate", ref=i, prompt="lorem ipsum " * 40, max_tokens=64,
                   session="heavy")
        f = heavy.until(lambda f, i=i: f.get("ref") == i)
        if f["type"] == "error":
            refused.append(f["code"])
    assert refused and set(refused) == {"rate_limited"}
    jobs = set()
    for i in range(30):
        light.send(type="generate", ref=i, prompt="hi", max_tokens=2, session="light")
        f = light.until(lambda f, i=i: f.get("ref") == i)
        assert f["type"] == "queued", f
        jobs.add(f["job_id"])
    light.finish(jobs)


def test_redis_down_fails_closed_with_unavailable(start_proc: Callable[..., Any],
                                                  sluice_env: dict[str, str]) -> None:
    """With Redis unreachable, readiness says so and requests get 'unavailable', fast."""
    from app.cli.dev.redis_server import free_port
    from tests.conftest import start_web

    dead = f"redis://127.0.0.1:{free_port()}/0"
    web = start_web(start_proc, {**sluice_env, "REDIS_URL": dead, "SLUICE_ALLOW_ANONYMOUS": "1"})
    status, _, body = _http(web.replace("ws://", "http://").replace("/ws", "/readyz"), None)
    assert status == 503 and "redis" in body["problems"]
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(web, timeout=10, header=["Authorization: Bearer sk-sluice-x"])
    assert e.value.status_code == 503
    c = Client(web)  # anonymous: the handshake needs no Redis
    try:
        t0 = time.monotonic()
        c.send(type="generate", ref="r", prompt="hello")
        err = c.recv()
        assert err["code"] == "unavailable" and err["ref"] == "r"
        assert time.monotonic() - t0 < 3
    finally:
        c.close()
