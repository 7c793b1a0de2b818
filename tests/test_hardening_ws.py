"""The front end under attack: revocation, malformed input, floods, Redis loss, shutdown, races."""

from __future__ import annotations

import json
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import websocket

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from app.cli.dev.redis_server import RedisServer, free_port
from app.tiers import load_tiers
from tasks import keys
from tasks.budget import Budget
from tasks.limits import Limits
from tests.conftest import Client, Proc, start_mock, start_web, start_worker, text_of, wait_for

SLOW = {"ttft_ms": 30, "itl_ms": 40, "output_tokens": 200}
SLOW_CONFIG = MockConfig(**SLOW)  # type: ignore[arg-type]
DEMO_KEY = "sk-sluice-" + secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def slow_mock(start_proc: Callable[..., Proc]) -> Iterator[str]:
    proc, url = start_mock(start_proc, **SLOW)
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def hard_env(sluice_env: dict[str, str], slow_mock: str) -> dict[str, str]:
    """A queue of its own, a slow model, and tight frame budgets."""
    return {**sluice_env, "OPENAI_BASE_URL": slow_mock, "SLUICE_QUEUE": "hardening",
            "SLUICE_METRICS_PORT": "0", "SLUICE_AUTH_TIMEOUT_S": "1",
            "SLUICE_SOCKET_FRAME_BURST": "30", "SLUICE_SOCKET_FRAMES_PER_S": "5",
            "SLUICE_KEY_FRAME_BURST": "40", "SLUICE_KEY_FRAMES_PER_S": "5",
            "SLUICE_MAX_FOLLOWS_PER_SOCKET": "4", "SLUICE_DEMO_KEY": DEMO_KEY}


@pytest.fixture(scope="module")
def hard_worker(start_proc: Callable[..., Proc], hard_env: dict[str, str]) -> Iterator[Proc]:
    """Stopped with the module: later tests (Flower's) must not find it on the broker."""
    proc = start_worker(start_proc, {**hard_env, "SLUICE_WORKER_CONCURRENCY": "50"}, "hard")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def hard_web_proc(start_proc: Callable[..., Proc], hard_env: dict[str, str],
                  hard_worker: Proc) -> Iterator[tuple[Proc, str]]:
    proc, url = start_web_proc(start_proc, hard_env)
    yield proc, url
    proc.stop()


@pytest.fixture(scope="module")
def hard_web(hard_web_proc: tuple[Proc, str]) -> str:
    return hard_web_proc[1]


@pytest.fixture(scope="module")
def roomy_web(start_proc: Callable[..., Proc], hard_env: dict[str, str],
              hard_worker: Proc) -> Iterator[str]:
    """Same stack, budgets out of the way and frames up to 250 kB (for the fuzzer)."""
    proc, url = start_web_proc(start_proc, {
        **hard_env, "SLUICE_SOCKET_FRAME_BURST": "1000000", "SLUICE_SOCKET_FRAMES_PER_S": "1000000",
        "SLUICE_KEY_FRAME_BURST": "1000000", "SLUICE_KEY_FRAMES_PER_S": "1000000",
        "SLUICE_MAX_FRAME_BYTES": "250000"})
    yield url
    proc.stop()


def start_web_proc(start_proc: Callable[..., Proc], env: dict[str, str]) -> tuple[Proc, str]:
    """Start a front end and keep hold of its process."""
    procs: list[Proc] = []

    def keep(*args: Any) -> Proc:
        procs.append(start_proc(*args))
        return procs[-1]
    url = start_web(keep, env)
    return procs[0], url


def new_key(r: redis.Redis, tier: str = "unlimited") -> tuple[str, str]:
    """A fresh API key: (raw key, key id)."""
    raw, info = KeyStore(r).create("hardening", tier)
    return raw, info.key_id


def until_close(c: Client, timeout_s: float = 10.0) -> tuple[list[dict[str, Any]], int]:
    """Read text frames until the server closes; return them and the close code."""
    c.ws.settimeout(timeout_s)
    frames = []
    while True:
        opcode, frame = c.ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return frames, int.from_bytes(frame.data[:2], "big")
        if opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(json.loads(frame.data))
            c.frames.append(frames[-1])


def limits_of(r: redis.Redis, tiers_file: Path, key_id: str, tier: str) -> Limits:
    return Budget(r).limits(key_id, load_tiers(tiers_file)[tier].rates)


# -- 1. revocation --------------------------------------------------------------

def test_revoking_a_key_closes_its_sockets_and_cancels_its_jobs(hard_web: str, r: redis.Redis,
                                                                connect: Callable[..., Client]) -> None:
    """Revoked mid-stream: within a second the socket gets 'unauthorized' + 4401 and the job is cancelled."""
    raw, key_id = new_key(r)
    c = connect(hard_web, key=raw)
    c.send(type="generate", prompt="revoke me", max_tokens=60)
    job_id = c.recv()["job_id"]
    c.until(lambda f: f.get("seq") == 10)
    t0 = time.monotonic()
    KeyStore(r).revoke(key_id)
    frames, code = until_close(c)
    assert time.monotonic() - t0 < 1.0
    assert code == 4401 and frames[-1]["type"] == "error" and frames[-1]["code"] == "unauthorized"
    status = lambda: (r.hget(keys.job(job_id), "status") or b"").decode()  # noqa: E731
    wait_for(lambda: status() == "cancelled", 1.0, "the revoked key's job to be cancelled")
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        Client(hard_web, raw)
    assert e.value.status_code == 401


def kill_pubsub_connections_of(r: redis.Redis, proc: Proc) -> int:
    """Drop the pub/sub connections one process tree holds to Redis (and no one else's:
    Celery's broadcast connection does not come back)."""
    tree = psutil.Process(proc.popen.pid)
    ports = {c.laddr.port for p in [tree, *tree.children(recursive=True)]
             for c in p.net_connections("tcp") if c.raddr}
    ours = [c for c in r.client_list(_type="pubsub") if int(c["addr"].rsplit(":", 1)[1]) in ports]
    for client in ours:
        r.client_kill_filter(_id=client["id"])
    return len(ours)


def test_a_revocation_missed_while_the_relay_was_away_is_caught(
        hard_web_proc: tuple[Proc, str], r: redis.Redis, connect: Callable[..., Client]) -> None:
    """A key revoked without the front end hearing it is caught when its pub/sub connection comes back."""
    proc, url = hard_web_proc
    raw, key_id = new_key(r)
    c = connect(url, key=raw)
    c.send(type="generate", prompt="quiet revoke", max_tokens=60)
    c.until(lambda f: f.get("type") == "token")
    r.hset(keys.api_key(key_id), "state", "revoked")  # as if the message had been lost
    assert kill_pubsub_connections_of(r, proc) == 1
    frames, code = until_close(c, timeout_s=5)
    assert code == 4401 and frames[-1]["code"] == "unauthorized"


# -- 2, 6, 7, 14. malformed input ----------------------------------------------------

def test_lone_surrogates_are_refused_before_admission(hard_web: str, r: redis.Redis,
                                                      tiers_file: Path,
                                                      connect: Callable[..., Client]) -> None:
    """A lone surrogate in session or prompt gets bad_field; the one-job key's slot and tokens stay free."""
    raw, key_id = new_key(r, "tiny")
    c = connect(hard_web, key=raw)
    for field in ('"session": "\\ud800", "prompt": "hi"', '"prompt": "a\\udfffb"',
                  '"messages": [{"role": "user", "content": "\\ud83d"}]'):
        c.ws.send('{"type": "generate", "ref": "s", "max_tokens": 5, ' + field + "}")
        err = c.recv()
        assert err["type"] == "error" and err["code"] == "bad_field" and err["ref"] == "s", err
        assert "surrogate" in err["message"]
    limits = limits_of(r, tiers_file, key_id, "tiny")
    assert limits.active_jobs == 0 and limits.remaining_tokens == limits.limit_tokens
    c.send(type="generate", prompt="still fine", max_tokens=3, session="ok")
    job_id = c.until(lambda f: f.get("type") == "queued")["job_id"]
    assert c.finish({job_id})[job_id][-1]["type"] == "done"


def test_an_unexpected_failure_answers_internal_and_keeps_the_socket(
        hard_web: str, r: redis.Redis, connect: Callable[..., Client]) -> None:
    """A resume that trips over a corrupt job record gets 'internal'; the socket then still works."""
    raw, key_id = new_key(r)
    bad_job = secrets.token_hex(16)
    r.hset(keys.job(bad_job), mapping={"owner": key_id, "status": "running", "seq": "garbage"})
    r.expire(keys.job(bad_job), 60)
    c = connect(hard_web, key=raw)
    c.send(type="resume", ref="r", job_id=bad_job, after=-1)
    err = c.recv()
    assert err["type"] == "error" and err["code"] == "internal" and err["ref"] == "r", err
    c.send(type="generate", prompt="after the failure", max_tokens=3)
    job_id = c.until(lambda f: f.get("type") == "queued")["job_id"]
    assert c.finish({job_id})[job_id][-1]["type"] == "done"


def test_deep_nesting_and_a_surrogate_key_get_error_frames(roomy_web: str,
                                                           connect: Callable[..., Client]) -> None:
    """JSON nested 100,000 deep, and an auth key holding a lone surrogate, get error frames; the socket lives."""
    c = connect(roomy_web, key=None)
    c.ws.send("[" * 100_000 + "]" * 100_000)
    assert c.recv()["code"] == "bad_json"
    c.ws.send('{"type": "auth", "key": "sk-sluice-\\ud800"}')
    assert c.recv()["code"] == "bad_field"
    c.send(type="auth", key="sk-sluice-wrong")
    frames, code = until_close(c)
    assert frames[-1]["code"] == "unauthorized" and code == 4401


@pytest.mark.parametrize(("literal", "shown"), [("NaN", "nan"), ("Infinity", "inf"),
                                                ("-Infinity", "-inf")])
def test_a_non_finite_temperature_is_named(hard_web: str, r: redis.Redis,
                                           connect: Callable[..., Client], literal: str,
                                           shown: str) -> None:
    """temperature NaN or ±Infinity gets bad_field with a message naming the value."""
    c = connect(hard_web, key=new_key(r)[0])
    c.ws.send('{"type": "generate", "prompt": "a", "temperature": ' + literal + "}")
    err = c.recv()
    assert err["code"] == "bad_field" and f"got {shown}" in err["message"], err


# -- 3. auth deadline --------------------------------------------------------------

def test_sockets_without_a_key_are_closed_after_the_auth_deadline(hard_web: str) -> None:
    """Sockets that never authenticate get 'auth_timeout' and close code 4408 after 1 s (the test setting)."""
    clients = [websocket.create_connection(hard_web, timeout=10) for _ in range(50)]
    t0 = time.monotonic()
    try:
        for ws in clients:
            frame = json.loads(ws.recv())
            assert frame["type"] == "error" and frame["code"] == "auth_timeout"
            opcode, data = ws.recv_data_frame(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE
            assert int.from_bytes(data.data[:2], "big") == 4408
        assert time.monotonic() - t0 < 4
    finally:
        for ws in clients:
            ws.shutdown()


# -- 4. frame budgets ----------------------------------------------------------------

def test_a_resume_flood_is_refused_not_replayed(hard_web: str, r: redis.Redis,
                                                connect: Callable[..., Client]) -> None:
    """3,000 resumes of a finished 61-event job replay it a bounded number of times; the rest are refused."""
    c = connect(hard_web, key=new_key(r)[0])
    c.send(type="generate", prompt="replay me", max_tokens=60)
    job_id = c.recv()["job_id"]
    events = len(c.finish({job_id})[job_id])
    c.frames.clear()
    flood = 3000
    for _ in range(flood):
        c.send(type="resume", job_id=job_id, after=-1)
    errors = replays = frames = 0
    while errors + replays < flood or sum(f.get("type") == "done" for f in c.frames) < replays:
        f = c.recv()
        frames += 1
        assert frames < flood + 30 * events, "the flood is being replayed"
        if f["type"] == "error" and "seq" not in f:
            assert f["code"] in ("rate_limited", "already_following"), f
            errors += 1
        elif f.get("seq") == 0:
            replays += 1
    assert replays <= 25
    assert any(f.get("code") == "rate_limited" and f.get("retry_after") for f in c.frames)


def test_a_key_frame_budget_spans_its_sockets(hard_web: str, r: redis.Redis,
                                              connect: Callable[..., Client]) -> None:
    """Three sockets each within their own budget, together over the key's, get rate_limited (scope 'key')."""
    raw = new_key(r, "thin")[0]  # 60 requests/min: the key's budget is max(40, 60) frames
    sockets = [connect(hard_web, key=raw) for _ in range(3)]
    for c in sockets:
        for _ in range(28):
            c.send(type="cancel", job_id="f" * 32)
    codes: list[tuple[str, str | None]] = []
    for c in sockets:
        for _ in range(28):
            f = c.recv()
            codes.append((f["code"], f.get("scope")))
    assert ("rate_limited", "socket") not in codes
    assert codes.count(("rate_limited", "key")) >= 10
    assert codes.count(("unknown_job", None)) >= 60


def test_a_generate_frame_the_key_budget_refuses_reserves_nothing(
        hard_web: str, r: redis.Redis, tiers_file: Path, connect: Callable[..., Client]) -> None:
    """A generate frame over the key's frame budget takes no request, token or slot; a refusal costs one frame.

    The frame is metered in admission's own Redis call: a frame the budget
    refuses must cost nothing else, and a request admission refuses still
    costs its frame, whether before its reservation (too_large) or in it.
    """
    raw, key_id = new_key(r, "thin")
    c = connect(hard_web, key=raw)
    frames = keys.frames(key_id)
    # Half a frame left, and no refill before the test ends (its clock starts in the future).
    never_us = f"{(time.time() + 600) * 1e6:.0f}"
    r.hset(frames, mapping={"level": "0.5", "ts_us": never_us})
    before = limits_of(r, tiers_file, key_id, "thin")
    c.send(type="generate", prompt="over the frame budget", max_tokens=5)
    f = c.recv()
    assert (f["type"], f["code"], f.get("scope")) == ("error", "rate_limited", "key"), f
    after = limits_of(r, tiers_file, key_id, "thin")
    assert (after.remaining_requests, after.remaining_tokens, after.active_jobs) == \
        (before.remaining_requests, before.remaining_tokens, 0)
    assert r.hget(frames, "level") == b"0.5"
    assert r.zcard(keys.slots(key_id)) == 0
    # Refused before the reservation (max_tokens over the tier's 64): one frame.
    r.hset(frames, mapping={"level": "10", "ts_us": never_us})
    c.send(type="generate", prompt="too long an answer", max_tokens=65)
    assert c.recv()["code"] == "too_large"
    assert float(r.hget(frames, "level") or 0) == 9
    # Refused by the reservation (more tokens than the bucket holds): one frame.
    r.hset(frames, mapping={"level": "10", "ts_us": never_us})
    r.hset(keys.bucket(key_id), mapping={"tokens": "3", "requests": "60", "ts_us": never_us})
    c.send(type="generate", prompt="no tokens left", max_tokens=5)
    assert c.recv()["code"] == "rate_limited"
    assert float(r.hget(frames, "level") or 0) == 9
    assert r.zcard(keys.slots(key_id)) == 0


def test_a_socket_follows_each_job_once_and_a_bounded_number(hard_web: str, r: redis.Redis,
                                                              connect: Callable[..., Client]) -> None:
    """Resuming a job the socket follows is refused without a replay; a 5th job on a 4-job socket is refused."""
    c = connect(hard_web, key=new_key(r)[0])
    jobs = []
    for i in range(4):
        c.send(type="generate", ref=i, prompt=f"follow {i}", max_tokens=30)
        jobs.append(c.until(lambda f: f.get("type") == "queued")["job_id"])
    c.send(type="resume", ref="again", job_id=jobs[0], after=-1)
    assert c.until(lambda f: f.get("ref") == "again")["code"] == "already_following"
    c.send(type="generate", ref="fifth", prompt="one too many", max_tokens=3)
    assert c.until(lambda f: f.get("ref") == "fifth")["code"] == "follow_limit"
    for job_id, ev in c.finish(set(jobs)).items():
        assert [e["seq"] for e in ev] == list(range(len(ev))), job_id


# -- 8. Redis loss ---------------------------------------------------------------------

def test_losing_redis_tells_clients_to_reconnect_and_new_work_flows_after(
        start_proc: Callable[..., Proc], hard_env: dict[str, str],
        connect: Callable[..., Client]) -> None:
    """Redis killed mid-stream: within seconds a 'reconnect' frame (unavailable) and 1013; once back, jobs run."""
    port = free_port()
    server = RedisServer(port).start()
    env = {**hard_env, "REDIS_URL": server.url, "SLUICE_QUEUE": "lossy"}
    worker = start_worker(start_proc, {**env, "SLUICE_WORKER_CONCURRENCY": "20"}, "lossy")
    web, url = start_web_proc(start_proc, env)
    try:
        raw = KeyStore(redis.Redis.from_url(server.url)).create("lossy", "unlimited")[0]
        c = connect(url, key=raw)
        c.send(type="generate", prompt="through an outage", max_tokens=100)
        job_id = c.recv()["job_id"]
        c.until(lambda f: f.get("seq") == 3)
        assert server.process is not None
        server.process.kill()
        server.stop()
        t0 = time.monotonic()
        frames, code = until_close(c, timeout_s=15)
        assert time.monotonic() - t0 < 5
        assert code == 1013
        last_seq = max(f["seq"] for f in c.frames if f.get("job_id") == job_id and "seq" in f)
        assert frames[-1] == {"type": "reconnect", "code": "unavailable",
                              "message": frames[-1]["message"], "jobs": {job_id: last_seq}}
        server = RedisServer(port).start()  # back, and empty
        KeyStore(redis.Redis.from_url(server.url)).create("lossy", "unlimited", raw=raw)

        def new_job_runs() -> bool:
            try:
                c2 = connect(url, key=raw)
            except websocket.WebSocketBadStatusException:  # 503 until Redis answers
                return False
            c2.send(type="generate", prompt="after the outage", max_tokens=3)
            q = c2.recv()
            return q["type"] == "queued" and c2.finish({q["job_id"]})[q["job_id"]][-1]["type"] == "done"
        wait_for(new_job_runs, 30, "a job to run after Redis came back")
    finally:
        worker.kill()  # its attempt at the lost job would hold up a warm shutdown
        for proc in (web, worker):
            proc.stop()
        server.stop()


def test_a_silent_redis_is_noticed_within_seconds(start_proc: Callable[..., Proc],
                                                  hard_env: dict[str, str],
                                                  connect: Callable[..., Client]) -> None:
    """A Redis that stops answering (CLIENT PAUSE) without dropping connections is counted as lost."""
    server = RedisServer().start()
    web, url = start_web_proc(start_proc, {**hard_env, "REDIS_URL": server.url,
                                           "SLUICE_QUEUE": "nobody-consumes"})
    client = redis.Redis.from_url(server.url)
    try:
        c = connect(url, key=KeyStore(client).create("paused", "unlimited")[0])
        c.send(type="generate", prompt="wait for me", max_tokens=5)
        job_id = c.recv()["job_id"]  # queued and followed; no worker ever takes it
        client.execute_command("CLIENT", "PAUSE", 8000, "ALL")
        t0 = time.monotonic()
        frames, code = until_close(c)
        assert time.monotonic() - t0 < 6
        assert code == 1013 and frames[-1]["jobs"] == {job_id: -1}
    finally:
        web.kill()
        web.stop()
        server.stop()
        client.close()


# -- 9. shutdown -------------------------------------------------------------------------

def test_sigterm_closes_sockets_at_once_and_clients_resume_elsewhere(
        start_proc: Callable[..., Proc], hard_env: dict[str, str], hard_worker: Proc,
        roomy_web: str, r: redis.Redis, connect: Callable[..., Client]) -> None:
    """SIGTERM: 'reconnect' (going_away) with the job's last seq and 1001 at once; resuming elsewhere leaves no gap."""
    raw = new_key(r)[0]
    web, url = start_web_proc(start_proc, hard_env)
    c = connect(url, key=raw)
    c.send(type="generate", prompt="move me", max_tokens=60)
    job_id = c.recv()["job_id"]
    c.until(lambda f: f.get("seq") == 5)
    t0 = time.monotonic()
    web.kill(signal.SIGTERM)
    frames, code = until_close(c)
    assert time.monotonic() - t0 < 2
    assert code == 1001
    goodbye = frames[-1]
    assert goodbye["type"] == "reconnect" and goodbye["code"] == "going_away"
    after = goodbye["jobs"][job_id]
    first = [f for f in c.frames if f.get("job_id") == job_id and "seq" in f]
    assert first[-1]["seq"] == after
    c2 = connect(roomy_web, key=raw)
    c2.send(type="resume", job_id=job_id, after=after)
    rest = c2.finish({job_id})[job_id]
    events = first + rest
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert text_of(events) == expected_text("move me", 60, SLOW_CONFIG)
    assert web.popen.wait(5) == 0


# -- 13. the demo key ------------------------------------------------------------------

def test_the_demo_keys_first_use_admits_concurrent_handshakes(hard_web: str) -> None:
    """Twenty simultaneous handshakes as the demo key's very first use are all accepted."""
    barrier = threading.Barrier(20)
    outcomes: list[object] = []

    def handshake() -> None:
        barrier.wait()
        try:
            ws = websocket.create_connection(hard_web, timeout=10,
                                             header=[f"Authorization: Bearer {DEMO_KEY}"])
            outcomes.append("ok")
            ws.close()
        except websocket.WebSocketBadStatusException as e:
            outcomes.append(e.status_code)
    threads = [threading.Thread(target=handshake) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["ok"] * 20


# -- the fuzzer --------------------------------------------------------------------------

STABLE_CODES = {"bad_json", "bad_frame", "unknown_type", "missing_field", "bad_field",
                "out_of_range", "unknown_model", "too_large", "unknown_job", "model_not_allowed"}
ODD_STRINGS = ["", "\ud800", "a\udfffb", "\ud83d", "\x00", "\u202e", "😀", "x" * 300,
               "sk-sluice-\ud800", "../../etc", "null", "\\u0000"]
ODD_NUMBERS: list[Any] = [0, -1, 1.5, 2**53 + 1, 2**64, -(2**63) - 1, 10**30, 1e308,
                          float("nan"), float("inf"), float("-inf"), -0.0, True, False, None]
# Each makes a generate frame unservable on its own (for the 'tiny' tier).
BAD_GENERATE: list[tuple[str, Any]] = [
    ("prompt", ""), ("prompt", 5), ("prompt", ["hi"]), ("prompt", "a\ud800"),
    ("prompt", "word " * 150),
    ("messages", []), ("messages", "hi"), ("messages", [{"role": "god", "content": "x"}]),
    ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": "\udc00"}]),
    ("model", "gpt-17"), ("model", 3), ("model", "mock-2"), ("model", "\ud800"),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**30), ("max_tokens", "10"),
    ("max_tokens", 1.5), ("max_tokens", True), ("max_tokens", 65), ("max_tokens", float("inf")),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1),
    ("temperature", 3), ("temperature", "hot"), ("temperature", True),
    ("session", ""), ("session", 5), ("session", "\ud800"), ("session", "s" * 201),
    ("ref", {}), ("ref", []), ("ref", True), ("ref", "r" * 201), ("ref", "\ud800"),
    ("seed", 2**64), ("seed", "x"), ("seed", 1.5),
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, odd ones favoured."""
    pick = rng.randrange(8 if depth < 4 else 5)
    if pick == 0:
        return rng.choice(ODD_NUMBERS)
    if pick == 1:
        return rng.choice(ODD_STRINGS)
    if pick == 2:
        return rng.randint(-(10**20), 10**20)
    if pick == 3:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x10FFFF)]))
                       for _ in range(rng.randrange(12)))
    if pick == 4:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if pick == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    obj = {rng.choice(["type", "ref", "prompt", "job_id", "after", "key", "x", "\ud800"]):
           random_json(rng, depth + 1) for _ in range(rng.randrange(5))}
    if rng.random() < 0.5:
        obj["type"] = rng.choice(["generate", "resume", "cancel", "auth", "dance", 7, None])
    return obj


def nested(depth: int, rng: random.Random) -> str:
    if depth > 10_000:  # lists only: 100,000 levels of objects would not fit in a frame
        return "[" * depth + "]" * depth
    opens, closes = zip(*(rng.choice([("[", "]"), ('{"a":', "}")]) for _ in range(depth)),
                        strict=True)
    return "".join(opens) + "1" + "".join(reversed(closes))


def fuzz_frame(rng: random.Random, i: int) -> str | bytes:
    """One frame that no stack should serve, of many kinds."""
    kind = rng.randrange(10)
    if kind == 0:
        return json.dumps(random_json(rng))
    if kind == 1:
        text = json.dumps({"type": "generate", "prompt": "hi", "x": random_json(rng)})
        return text[:rng.randrange(len(text))]  # cut short
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 3:
        depth = rng.choice([33, 100, 5000, 100_000])
        inner = nested(depth, rng)
        return inner if rng.random() < 0.5 else '{"type": "generate", "prompt": "x", "x": ' + inner + "}"
    if kind == 4:
        return json.dumps({"type": "resume", "job_id": rng.choice(
            ["0" * 32, "F" * 32, "../etc", 5, None, "\ud800", secrets.token_hex(16)]),
            "after": rng.choice([-1, -5, 2**60, "x", 1.5, 0])})
    if kind == 5:
        return json.dumps({"type": "cancel", "job_id": rng.choice(
            ["f" * 32, secrets.token_hex(16), "", 7, "\udfff"])})
    if kind == 6:
        return json.dumps({"type": "auth", "key": rng.choice([*ODD_STRINGS, 5, None])})
    frame: dict[str, Any] = {"type": "generate", "prompt": "hi", "max_tokens": 5}
    for field, value in rng.sample(BAD_GENERATE, rng.randrange(1, 4)):
        frame[field] = value
    if rng.random() < 0.3:
        frame["extra"] = random_json(rng)
    return json.dumps(frame)


def test_fuzzed_frames_get_stable_errors_and_leave_nothing_behind(
        roomy_web: str, r: redis.Redis, tiers_file: Path, connect: Callable[..., Client]) -> None:
    """Thousands of hostile frames each get one error frame with a stable code; slots and buckets are untouched."""
    rng = random.Random(20261127)
    raw, key_id = new_key(r, "tiny")
    c = connect(roomy_web, key=raw)
    before = limits_of(r, tiers_file, key_id, "tiny")
    frames: list[str | bytes] = [fuzz_frame(rng, i) for i in range(3000)]
    limit = 250_000
    pad = '{"type": "generate", "prompt": "' + "y" * (limit - 40)
    frames += [pad[:limit - 2] + '"}', json.dumps({"type": "generate", "prompt": "\ud800" + "y" * (limit // 8)}),
               '{"type": "generate", "prompt": "' + "y" * (limit - 200) + '", "session": "\\ud800"}']
    codes: dict[str, int] = {}
    t0 = time.monotonic()
    for frame in frames:
        if isinstance(frame, bytes):
            c.ws.send_binary(frame)
        else:
            c.ws.send(frame)
        answer = c.recv()
        assert answer["type"] == "error" and "seq" not in answer, (frame[:200], answer)
        assert answer["code"] in STABLE_CODES, (frame[:200], answer)
        codes[answer["code"]] = codes.get(answer["code"], 0) + 1
    assert time.monotonic() - t0 < 20
    assert len(codes) >= 8, codes
    after = limits_of(r, tiers_file, key_id, "tiny")
    assert (after.remaining_tokens, after.remaining_requests, after.active_jobs) == \
        (before.remaining_tokens, before.remaining_requests, 0)
    assert r.zcard(keys.slots(key_id)) == 0
    assert Budget(r).usage(key_id, 1)[0].requests == 0
    c.send(type="generate", prompt="still usable", max_tokens=3)
    job_id = c.until(lambda f: f.get("type") == "queued")["job_id"]
    assert c.finish({job_id})[job_id][-1]["type"] == "done"
    c.ws.send('{"type": "generate", "prompt": "' + "z" * limit + '"}')
    assert until_close(c)[1] == 1009
