"""Worker failures on a stack of several worker processes at default lease settings.

Killed and stalled workers, redelivered messages, provider errors, job
timeouts and a Redis outage — and after each, billing checked exactly with a
limited key: its bucket, slots, reservation and usage show one settlement of
exactly what was consumed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from app.cli.dev.redis_server import find_redis_server, free_port
from tasks import keys
from tasks.budget import today
from tasks.config import Settings
from tasks.queue import TASK_NAME, make_celery
from tests.conftest import Client, Proc, start_mock, start_web, start_worker, text_of, wait_for

SLOW = {"ttft_ms": 50, "itl_ms": 50, "output_tokens": 200}
SLOW_CONFIG = MockConfig(**SLOW)  # type: ignore[arg-type]
QUEUE = "failures"
#: The 'ledger' tier of conftest.TIERS_TOML.
LEDGER_TOKENS, LEDGER_REQUESTS = 120, 1


# -- the stack --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_mock(start_proc: Callable[..., Proc]) -> str:
    return start_mock(start_proc, **SLOW)[1]


@pytest.fixture(scope="module")
def env(sluice_env: dict[str, str], slow_mock: str) -> dict[str, str]:
    """The session's settings with lease, heartbeat and reaper at their defaults, on a queue of our own."""
    out = {**sluice_env, "OPENAI_BASE_URL": slow_mock, "SLUICE_QUEUE": QUEUE,
           "SLUICE_METRICS_PORT": "0", "SLUICE_WORKER_CONCURRENCY": "20"}
    out.pop("SLUICE_LEASE_TTL_S")
    return out


@pytest.fixture(scope="module")
def web(start_proc: Callable[..., Proc], env: dict[str, str]) -> str:
    return start_web(start_proc, env)


class Pool:
    """Worker processes on one queue, each serving its metrics, so a test can tell which runs a job."""

    def __init__(self, start_proc: Callable[..., Proc], env: dict[str, str], size: int) -> None:
        self.start_proc = start_proc
        self.env = env
        self.ports: dict[Proc, int] = {}
        for _ in range(size):
            self.add()

    def add(self) -> Proc:
        """Start one more worker."""
        port = free_port()
        proc = start_worker(self.start_proc, {**self.env, "SLUICE_METRICS_PORT": str(port)},
                            "pool")
        self.ports[proc] = port
        return proc

    def running(self) -> Proc:
        """The worker that is generating a job now (there must be exactly one)."""
        def busy() -> list[Proc]:
            return [p for p, port in self.ports.items()
                    if p.popen.poll() is None and _in_flight(port) > 0]
        found = wait_for(busy, 5, "a worker to report a job in flight")
        assert len(found) == 1, "more than one worker is generating"
        return found[0]  # type: ignore[no-any-return]

    def replace(self, dead: Proc) -> None:
        """Forget a worker that was killed and start another in its place."""
        dead.stop()
        del self.ports[dead]
        self.add()

    def stop(self) -> None:
        for proc in self.ports:
            proc.stop()


@pytest.fixture(scope="module")
def pool(start_proc: Callable[..., Proc], env: dict[str, str]) -> Iterator[Pool]:
    workers = Pool(start_proc, env, 2)
    yield workers
    workers.stop()


def _in_flight(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("sluice_jobs_in_flight "):
            return float(line.split()[1])
    return 0.0


def mock_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


# -- billing ----------------------------------------------------------------------------------------

class Ledger:
    """A fresh 'ledger' key and the job it runs, with what its settlement must show."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.raw, info = KeyStore(r).create("ledger", "ledger")
        self.key_id = info.key_id
        self.job_id = ""
        self.reserved = 0

    def submitted(self, queued: dict[str, Any]) -> str:
        """Note the job's reservation from its ``queued`` frame (the bucket was full before)."""
        assert queued["type"] == "queued", queued
        self.job_id = queued["job_id"]
        self.reserved = LEDGER_TOKENS - queued["limits"]["remaining_tokens"]
        return self.job_id

    def prompt_tokens(self, max_tokens: int) -> int:
        """The prompt's tokens as admission counted them."""
        return self.reserved - max_tokens

    def assert_settled(self, prompt_tokens: int, completion_tokens: int) -> None:
        """One settlement of exactly these tokens: bucket, slot, reservation and usage agree."""
        r, kid = self.r, self.key_id
        assert not r.exists(keys.reservation(self.job_id)), "the reservation was not settled"
        assert r.zcard(keys.slots(kid)) == 0, "the concurrency slot is still held"
        usage = {k.decode(): int(v) for k, v in r.hgetall(keys.usage(kid, today())).items()}
        assert usage == {"requests": 1, "prompt_tokens": prompt_tokens,
                         "completion_tokens": completion_tokens}
        bucket = {k.decode(): float(v) for k, v in r.hgetall(keys.bucket(kid)).items()}
        # The reserve left 0 requests; the settle refilled them at 1/60 per second,
        # which dates the settle after the reserve.
        elapsed_s = bucket["requests"] * 60 / LEDGER_REQUESTS
        assert 0 < elapsed_s < 60
        rate = LEDGER_TOKENS / 60
        charged = prompt_tokens + completion_tokens
        before_settle = min(LEDGER_TOKENS, LEDGER_TOKENS - self.reserved + rate * elapsed_s)
        expected = min(LEDGER_TOKENS, before_settle + self.reserved - charged)
        assert bucket["tokens"] == pytest.approx(expected, abs=1e-6), (bucket, expected)

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a second settlement or a second run would change."""
        r, kid, jid = self.r, self.key_id, self.job_id
        return (r.hgetall(keys.bucket(kid)), r.zrange(keys.slots(kid), 0, -1, withscores=True),
                r.hgetall(keys.usage(kid, today())), r.exists(keys.reservation(jid)),
                r.xlen(keys.log(jid)), r.hgetall(keys.job(jid)))


@pytest.fixture
def ledger(r: redis.Redis) -> Ledger:
    return Ledger(r)


def words(events: list[dict[str, Any]]) -> int:
    """How many mock tokens (one word each) the job's last attempt sent."""
    return len(text_of(events).split())


def unacked(r: redis.Redis, queue: str) -> int:
    """How many messages of ``queue`` kombu holds as taken but not acked."""
    return sum(1 for raw in r.hvals("unacked") if json.loads(raw)[2] == queue)


def contiguous(events: list[dict[str, Any]]) -> bool:
    return [e["seq"] for e in events] == list(range(len(events)))


# -- worker death -----------------------------------------------------------------------------------

def test_killed_worker_restarts_within_five_seconds_and_bills_once(
        pool: Pool, web: str, ledger: Ledger, connect: Callable[..., Client]) -> None:
    """kill -9 mid-stream at default settings: 'restart' within 5 s, whole text, settled exactly once."""
    c = connect(web, key=ledger.raw)
    c.send(type="generate", prompt="survive a kill", max_tokens=40)
    job_id = ledger.submitted(c.recv())
    for _ in range(5):
        c.until(lambda f: f.get("type") == "token")
    victim = pool.running()
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.popen.wait()
    c.until(lambda f: f.get("type") == "restart")
    took_s = time.monotonic() - killed_at
    ev = c.finish({job_id})[job_id]
    pool.replace(victim)
    print(f"kill -9 -> restart: {took_s:.2f} s", file=sys.stderr)
    assert took_s < 5.0, f"the restart came {took_s:.1f} s after the kill"
    assert contiguous(ev) and [e["type"] for e in ev].count("restart") == 1
    assert text_of(ev) == expected_text("survive a kill", 40, SLOW_CONFIG)
    done = ev[-1]
    assert done["type"] == "done" and done["metrics"]["attempts"] == 2
    ledger.assert_settled(done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"])


def test_stalled_worker_is_fenced_off_and_halts(pool: Pool, web: str, slow_mock: str,
                                                connect: Callable[..., Client]) -> None:
    """A worker frozen past its lease: another re-runs the job; thawed, it writes nothing and closes its stream."""
    c = connect(web)
    c.send(type="generate", prompt="freeze mid-stream", max_tokens=120)
    job_id = c.recv()["job_id"]
    for _ in range(3):
        c.until(lambda f: f.get("type") == "token")
    stale = pool.running()
    stale.kill(signal.SIGSTOP)
    try:
        aborted = mock_stats(slow_mock)["streams_aborted"]
        c.until(lambda f: f.get("type") == "restart")
    finally:
        stale.kill(signal.SIGCONT)
    # The stale attempt's stream is still running at the mock: halting closes it.
    wait_for(lambda: mock_stats(slow_mock)["streams_aborted"] > aborted, 5,
             "the stale attempt to close its provider stream")
    ev = c.finish({job_id})[job_id]
    assert contiguous(ev) and [e["type"] for e in ev].count("restart") == 1
    assert text_of(ev) == expected_text("freeze mid-stream", 120, SLOW_CONFIG)
    assert ev[-1]["type"] == "done" and ev[-1]["metrics"]["attempts"] == 2
    assert "lease lost" in stale.log() and stale.popen.poll() is None


def test_redelivered_copies_change_nothing(pool: Pool, web: str, ledger: Ledger,
                                           sluice_env: dict[str, str],
                                           connect: Callable[..., Client]) -> None:
    """A copy of a running job's message and one of an ended job's: no second run, event or settlement."""
    celery = make_celery(Settings.from_env(sluice_env))
    try:
        c = connect(web, key=ledger.raw)
        c.send(type="generate", prompt="copy me", max_tokens=20)
        job_id = ledger.submitted(c.recv())
        c.until(lambda f: f.get("type") == "token")
        logs = lambda: "".join(p.log() for p in pool.ports)  # noqa: E731
        celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE)
        wait_for(lambda: f"job {job_id} runs in another attempt; this copy does nothing" in logs(),
                 5, "the worker to drop the copy of the running job")
        ev = c.finish({job_id})[job_id]
        assert contiguous(ev) and "restart" not in [e["type"] for e in ev]
        assert ev[-1]["type"] == "done" and ev[-1]["metrics"]["attempts"] == 1
        ledger.assert_settled(ev[-1]["usage"]["prompt_tokens"], 20)
        before = ledger.snapshot()
        celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE)
        wait_for(lambda: f"job {job_id} has ended; this copy does nothing" in logs(), 5,
                 "the worker to drop the copy of the ended job")
        assert ledger.snapshot() == before
    finally:
        celery.close()  # its broker connection: a leaked socket fails a later test


def test_final_event_and_settlement_are_one_redis_call(pool: Pool, web: str, r: redis.Redis,
                                                       ledger: Ledger,
                                                       connect: Callable[..., Client]) -> None:
    """The done event is logged and the reservation settled in one script: no crash can come between."""
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def watch() -> None:
        with r.monitor() as m:
            ready.set()
            for cmd in m.listen():
                seen.append(cmd)
                if ledger.job_id and cmd["command"] == f"DEL {keys.reservation(ledger.job_id)}":
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(5)
    c = connect(web, key=ledger.raw)
    c.send(type="generate", prompt="atomic end", max_tokens=3)
    job_id = ledger.submitted(c.recv())
    c.finish({job_id})
    watcher.join(10)
    done = next(i for i, cmd in enumerate(seen)
                if cmd["command"].startswith(f"XADD {keys.log(job_id)}") and '"done"' in cmd["command"])
    settle = next(i for i, cmd in enumerate(seen)
                  if cmd["command"] == f"DEL {keys.reservation(job_id)}")
    between = seen[min(done, settle):max(done, settle) + 1]
    assert all(cmd["client_type"] == "lua" for cmd in between), \
        [cmd["command"][:80] for cmd in between if cmd["client_type"] != "lua"]


# -- chat sessions and positions across workers -----------------------------------------------------

def test_session_runs_in_order_across_workers(pool: Pool, web: str,
                                              connect: Callable[..., Client]) -> None:
    """Four jobs of one session on two workers: positions 0-3, each starts after the previous ends."""
    c = connect(web)
    for i in range(4):
        c.send(type="generate", ref=i, prompt=f"turn {i}", max_tokens=3, session="across")
    queued = [c.until(lambda f: f.get("type") == "queued") for _ in range(4)]
    assert [q["position"] for q in queued] == [0, 1, 2, 3]
    jobs = [q["job_id"] for q in queued]
    events = c.finish(set(jobs))
    order = [f["job_id"] for f in c.frames if "seq" in f]
    runs = [j for i, j in enumerate(order) if i == 0 or order[i - 1] != j]
    assert runs == jobs
    for i, job_id in enumerate(jobs):
        assert text_of(events[job_id]) == expected_text(f"turn {i}", 3, SLOW_CONFIG)


def test_queued_position_counts_the_jobs_waiting(start_proc: Callable[..., Proc],
                                                 env: dict[str, str],
                                                 connect: Callable[..., Client]) -> None:
    """Without a session, position is the number of jobs waiting in the queue; all run once a worker comes."""
    idle = {**env, "SLUICE_QUEUE": "failures-idle"}
    c = connect(start_web(start_proc, idle))
    for i in range(3):
        c.send(type="generate", ref=i, prompt=f"wait {i}", max_tokens=2)
    queued = [c.until(lambda f: f.get("type") == "queued") for _ in range(3)]
    assert [q["position"] for q in queued] == [0, 1, 2]
    worker = start_worker(start_proc, idle, "idle")
    try:
        events = c.finish({q["job_id"] for q in queued})
    finally:
        worker.stop()
    assert all(events[q["job_id"]][-1]["type"] == "done" for q in queued)


# -- provider failures and timeouts -----------------------------------------------------------------

@pytest.fixture(scope="module")
def failing_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "SLUICE_QUEUE": "failures-provider"}


@pytest.fixture(scope="module")
def failing_web(start_proc: Callable[..., Proc], failing_env: dict[str, str]) -> str:
    return start_web(start_proc, failing_env)


@pytest.mark.parametrize(("mode", "code"), [("429", "provider_429"), ("500", "provider_500"),
                                            ("cut", "provider_stream_broken")])
def test_provider_failure_ends_the_job_and_bills_what_was_sent(
        start_proc: Callable[..., Proc], failing_env: dict[str, str], failing_web: str,
        ledger: Ledger, connect: Callable[..., Client], mode: str, code: str) -> None:
    """A 429, a 500 or a cut stream ends the job with its error code; the key pays only for tokens sent."""
    _, url = start_mock(start_proc, ttft_ms=20, itl_ms=10, output_tokens=30, fail_rate=1.0,
                        fail_mode=mode)
    worker = start_worker(start_proc, {**failing_env, "OPENAI_BASE_URL": url}, f"fail-{mode}")
    try:
        c = connect(failing_web, key=ledger.raw)
        c.send(type="generate", prompt="fail me", max_tokens=30)
        job_id = ledger.submitted(c.recv())
        ev = c.finish({job_id})[job_id]
    finally:
        worker.stop()
    end = ev[-1]
    assert contiguous(ev) and end["type"] == "error" and end["code"] == code, end
    assert end["message"]
    sent = words(ev)
    if mode == "cut":
        assert sent == 15 and [e["type"] for e in ev[:-1]] == ["token"] * len(ev[:-1])
        ledger.assert_settled(ledger.prompt_tokens(30), sent)
    else:
        assert len(ev) == 1
        ledger.assert_settled(0, 0)


def test_job_timeout_ends_with_timeout_and_bills_what_was_sent(
        start_proc: Callable[..., Proc], failing_env: dict[str, str], failing_web: str,
        ledger: Ledger, connect: Callable[..., Client]) -> None:
    """A job longer than SLUICE_JOB_TIMEOUT_S ends with error 'timeout'; the key pays for what it got."""
    worker = start_worker(start_proc, {**failing_env, "SLUICE_JOB_TIMEOUT_S": "1"}, "timeout")
    try:
        c = connect(failing_web, key=ledger.raw)
        c.send(type="generate", prompt="take too long", max_tokens=60)
        job_id = ledger.submitted(c.recv())
        started = time.monotonic()
        ev = c.finish({job_id})[job_id]
        took_s = time.monotonic() - started
    finally:
        worker.stop()
    end = ev[-1]
    assert contiguous(ev) and end["type"] == "error" and end["code"] == "timeout", end
    assert end["message"] == "the job ran longer than 1 s"
    assert 1.0 <= took_s < 2.0
    assert 0 < words(ev) < 60
    ledger.assert_settled(ledger.prompt_tokens(60), words(ev))


def test_cancel_bills_the_prompt_and_the_tokens_sent(pool: Pool, web: str, ledger: Ledger,
                                                     connect: Callable[..., Client]) -> None:
    """A cancelled job pays for its prompt and the tokens the client got, nothing more."""
    c = connect(web, key=ledger.raw)
    c.send(type="generate", prompt="cancel and bill", max_tokens=40)
    job_id = ledger.submitted(c.recv())
    for _ in range(3):
        c.until(lambda f: f.get("type") == "token")
    c.send(type="cancel", job_id=job_id)
    ev = c.finish({job_id})[job_id]
    assert ev[-1]["type"] == "error" and ev[-1]["code"] == "cancelled"
    ledger.assert_settled(ledger.prompt_tokens(40), words(ev))


# -- messages lost with their worker ----------------------------------------------------------------

def test_message_taken_by_a_worker_that_died_is_delivered_again(
        start_proc: Callable[..., Proc], failing_env: dict[str, str], failing_web: str,
        ledger: Ledger, r: redis.Redis, connect: Callable[..., Client]) -> None:
    """A worker killed between taking a job's message and leasing the job: the job runs after the visibility timeout."""
    c = connect(failing_web, key=ledger.raw)
    c.send(type="generate", prompt="lost and found", max_tokens=5)
    job_id = ledger.submitted(c.recv())
    # A consumer takes the message without acking it, and dies.
    taker = ("import os\nfrom kombu import Connection\n"
             f"with Connection({failing_env['REDIS_URL']!r}) as conn:\n"
             f"    conn.SimpleQueue({failing_env['SLUICE_QUEUE']!r}).get(timeout=10)\n"
             "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", taker], check=True, timeout=30)
    queue = failing_env["SLUICE_QUEUE"]
    assert unacked(r, queue) == 1 and r.hget(keys.job(job_id), "status") == b"queued"
    worker = start_worker(start_proc, {**failing_env, "SLUICE_VISIBILITY_TIMEOUT_S": "2"},
                          "visibility")
    try:
        ev = c.finish({job_id})[job_id]
    finally:
        worker.stop()
    assert contiguous(ev) and ev[-1]["type"] == "done" and ev[-1]["metrics"]["attempts"] == 1
    assert text_of(ev) == expected_text("lost and found", 5, SLOW_CONFIG)
    assert unacked(r, queue) == 0
    ledger.assert_settled(ev[-1]["usage"]["prompt_tokens"], 5)


def test_job_whose_message_was_lost_is_sent_again(
        start_proc: Callable[..., Proc], failing_env: dict[str, str], failing_web: str,
        ledger: Ledger, r: redis.Redis, connect: Callable[..., Client]) -> None:
    """A job whose message vanished before any attempt leased it is sent again from the unstarted index."""
    c = connect(failing_web, key=ledger.raw)
    c.send(type="generate", prompt="sent again", max_tokens=5)
    job_id = ledger.submitted(c.recv())
    # A consumer takes the message, acks it and dies: no broker holds it any more
    # (what a message lost between kombu's BRPOP and its unacked bookkeeping looks like).
    taker = ("import os\nfrom kombu import Connection\n"
             f"with Connection({failing_env['REDIS_URL']!r}) as conn:\n"
             f"    conn.SimpleQueue({failing_env['SLUICE_QUEUE']!r}).get(timeout=10).ack()\n"
             "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", taker], check=True, timeout=30)
    queue = failing_env["SLUICE_QUEUE"]
    assert unacked(r, queue) == 0 and r.llen(queue) == 0
    assert r.hget(keys.job(job_id), "status") == b"queued"
    assert r.zscore(keys.UNSTARTED, job_id) is not None
    worker = start_worker(start_proc, {**failing_env, "SLUICE_UNSTARTED_GRACE_S": "1"}, "resend")
    try:
        ev = c.finish({job_id})[job_id]
    finally:
        worker.stop()
    assert contiguous(ev) and ev[-1]["type"] == "done" and ev[-1]["metrics"]["attempts"] == 1
    assert text_of(ev) == expected_text("sent again", 5, SLOW_CONFIG)
    assert r.zscore(keys.UNSTARTED, job_id) is None
    ledger.assert_settled(ev[-1]["usage"]["prompt_tokens"], 5)


# -- Redis outage -----------------------------------------------------------------------------------

class DurableRedis:
    """A redis-server that logs every write to disk before answering, so it can be killed and brought back."""

    def __init__(self, start_proc: Callable[..., Proc], data_dir: Path) -> None:
        self.start_proc = start_proc
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self.start()

    def start(self) -> Proc:
        proc = self.start_proc("durable-redis", [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
            "--dir", str(self.data_dir), "--loglevel", "warning"], {})
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False
        wait_for(up, 10, "redis-server to answer")
        client.close()
        return proc


def test_redis_outage_mid_stream_reruns_the_job(start_proc: Callable[..., Proc],
                                                sluice_env: dict[str, str], slow_mock: str,
                                                tmp_path: Path) -> None:
    """Redis killed mid-stream: the attempt gives up, the job re-runs whole once Redis is back, the worker lives on."""
    store = DurableRedis(start_proc, tmp_path)
    env = {**sluice_env, "REDIS_URL": store.url, "OPENAI_BASE_URL": slow_mock,
           "SLUICE_QUEUE": "outage", "SLUICE_METRICS_PORT": "0"}
    env.pop("SLUICE_LEASE_TTL_S")
    with redis.Redis.from_url(store.url) as client:
        key = KeyStore(client).create("outage", "unlimited")[0]
    worker = start_worker(start_proc, env, "outage")
    url = start_web(start_proc, env)
    try:
        c = Client(url, key)
        c.send(type="generate", prompt="through an outage", max_tokens=60)
        job_id = c.recv()["job_id"]
        for _ in range(5):
            c.until(lambda f: f.get("type") == "token")
        c.close()
        store.proc.kill(signal.SIGKILL)
        store.proc.popen.wait()
        # Giving up takes a lease period of failed appends; the lease, last
        # renewed before the kill, has run out by then.
        log = worker.wait_log("Redis unreachable; left for a re-run", 15)
        assert f"job {job_id}: append failed, retrying" in log
        store.proc = store.start()
        back = time.monotonic()
        c = Client(url, key, timeout_s=60)
        c.send(type="resume", job_id=job_id, after=-1)
        c.until(lambda f: f.get("type") == "restart")
        rerun_s = time.monotonic() - back
        ev = c.finish({job_id})[job_id]
        c.close()
        assert contiguous(ev) and [e["type"] for e in ev].count("restart") == 1
        assert text_of(ev) == expected_text("through an outage", 60, SLOW_CONFIG)
        assert ev[-1]["type"] == "done" and ev[-1]["metrics"]["attempts"] == 2
        print(f"Redis back -> restart: {rerun_s:.1f} s", file=sys.stderr)
        # The same worker process serves new jobs: its consumer reconnected.
        c = Client(url, key)
        c.send(type="generate", prompt="after the outage", max_tokens=3)
        after = c.recv()["job_id"]
        assert c.finish({after})[after][-1]["type"] == "done"
        c.close()
        assert worker.popen.poll() is None
    finally:
        worker.stop()
