"""Real parts for every test: a redis-server, the mock model, Celery workers, gunicorn front ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import websocket
from kombu import Connection

from app.apikeys import KeyStore
from app.cli.dev.redis_server import RedisServer, free_port
from tasks.events import EventLog
from tasks.jobs import JobStore

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MOCK = {"ttft_ms": 40, "itl_ms": 15, "output_tokens": 12}


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


class Proc:
    """A child process whose output goes to a log file, stopped at teardown."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout_s: float = 30.0) -> str:
        """Wait for ``needle`` in the output; fail with the log if the process dies first."""
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")
            return needle in self.log()
        wait_for(seen, timeout_s, f"{self.name} to print {needle!r}")
        return self.log()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, wait_s: float = 10.0) -> None:
        """Terminate politely, then kill after ``wait_s``."""
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
        self.reap(wait_s)

    def reap(self, wait_s: float) -> None:
        """Wait ``wait_s`` for the process to end (after a SIGTERM), then kill it."""
        if self.popen.poll() is None:
            try:
                self.popen.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait()
        self._log.close()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def store(r: redis.Redis) -> JobStore:
    """The job store on the session's Redis."""
    return JobStore(r, ttl_s=600)


@pytest.fixture
def log(r: redis.Redis) -> EventLog:
    """The event log on the session's Redis."""
    return EventLog(r, ttl_s=60)


@pytest.fixture(scope="session")
def start_proc(log_dir: Path, redis_server: RedisServer) -> Iterator[Callable[..., Proc]]:
    """Start processes that are all stopped when the session ends (before Redis stops)."""
    procs: list[Proc] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, log_dir)
        procs.append(proc)
        return proc

    yield start
    # All at once, then one deadline for all: stopped one after another, the
    # session's processes took over half a minute.
    for proc in procs:
        if proc.popen.poll() is None:
            proc.kill(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        proc.reap(max(0.1, deadline - time.monotonic()))


def start_mock(start_proc: Callable[..., Proc], **config: Any) -> tuple[Proc, str]:
    """Start a mock model; return it and its base URL."""
    args = ", ".join(f"{k}={v!r}" for k, v in {**MOCK, **config}.items())
    proc = start_proc("mockllm", [sys.executable, "-c",
                                  "from app.cli.dev.mockllm import serve, MockConfig; "
                                  f"serve(MockConfig({args}), port=0)"], {})
    line = proc.wait_log("listening on ")
    url = line.split("listening on ", 1)[1].split()[0]
    return proc, url


@pytest.fixture(scope="session")
def mock(start_proc: Callable[..., Proc]) -> str:
    """The session's mock model base URL (``…/v1``)."""
    return start_mock(start_proc)[1]


TIERS_TOML = """
[tiers.tiny]
tokens_per_minute = 600
requests_per_minute = 1000
max_concurrent_jobs = 1
max_prompt_tokens = 100
max_output_tokens = 64
default_output_tokens = 16
models = ["mock-1"]

[tiers.thin]
tokens_per_minute = 600
max_concurrent_jobs = 50
max_prompt_tokens = 100
max_output_tokens = 64
default_output_tokens = 16

# Exact billing checks: one request per key and minute, so the request level
# a settle leaves says how long after the reserve it came.
[tiers.ledger]
tokens_per_minute = 120
requests_per_minute = 1
max_concurrent_jobs = 1
max_prompt_tokens = 40
max_output_tokens = 64
default_output_tokens = 16

# Bulk and batch items: 5 at once and 20,000 tokens/min, all of it for batches.
# (Tiers are the same in every process: the pump on any worker admits with them.)
[tiers.bulk5]
tokens_per_minute = 20_000
requests_per_minute = 100_000
max_concurrent_jobs = 5
max_prompt_tokens = 1_000
max_output_tokens = 64
default_output_tokens = 16
batch_share = 1.0

# Half of the buckets and slots for batches, half kept for interactive requests.
[tiers.halves]
tokens_per_minute = 100_000
requests_per_minute = 100_000
max_concurrent_jobs = 4
batch_share = 0.5
# Bulk items from an empty bucket start one every ~1.4 s (10 tokens/s, all for bulks).
[tiers.drip]
tokens_per_minute = 600
requests_per_minute = 1000
max_concurrent_jobs = 2
max_prompt_tokens = 100
max_output_tokens = 64
default_output_tokens = 16
batch_share = 1.0

# A generate the token bucket refuses is held (queue_instead_of_429) for up to
# 30 s ('holds') or 1 s ('holds_briefly') instead of refused.
[tiers.holds]
tokens_per_minute = 600
requests_per_minute = 1000
max_concurrent_jobs = 2
max_prompt_tokens = 100
max_output_tokens = 64
default_output_tokens = 16
queue_instead_of_429 = true
queue_max_wait_s = 30

[tiers.holds_briefly]
tokens_per_minute = 600
requests_per_minute = 1000
max_concurrent_jobs = 2
max_prompt_tokens = 100
max_output_tokens = 64
default_output_tokens = 16
queue_instead_of_429 = true
queue_max_wait_s = 1
"""


@pytest.fixture(scope="session")
def tiers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiers file adding 'tiny' (600 tokens/min, one job at a time) and 'thin' (600 tokens/min)."""
    path = tmp_path_factory.mktemp("config") / "tiers.toml"
    path.write_text(TIERS_TOML)
    return path


@pytest.fixture(scope="session")
def sluice_env(redis_server: RedisServer, mock: str, tiers_file: Path) -> dict[str, str]:
    """Environment shared by the session's workers and front ends."""
    return {
        "SLUICE_TIERS_FILE": str(tiers_file),
        "REDIS_URL": redis_server.url,
        "OPENAI_BASE_URL": mock,
        "OPENAI_API_KEY": "sk-test",
        "SLUICE_MODELS": "mock-1,mock-2",
        "SLUICE_LEASE_TTL_S": "2",
        "SLUICE_MAX_FRAME_BYTES": "3000",
        "SLUICE_WORKER_CONCURRENCY": "300",
        "SLUICE_PROVIDER_MAX_RETRIES": "0",
        "SLUICE_METRICS_PORT": str(free_port()),
        "SLUICE_BATCH_MAX_FILE_BYTES": "200000",
        "SLUICE_BULK_STARTS_PER_S": "1000",
    }


def start_worker(start_proc: Callable[..., Proc], env: dict[str, str], name: str = "w") -> Proc:
    """Start one Celery worker process (gevent pool) and wait until it consumes."""
    proc = start_proc(f"worker-{name}", [
        str(BIN / "celery"), "-A", "workers.make_celery", "worker", "-P", "gevent",
        "-c", env.get("SLUICE_WORKER_CONCURRENCY", "300"),
        "-Q", f'{env.get("SLUICE_QUEUE", "sluice")},{env.get("SLUICE_BULK_QUEUE", "sluice-bulk")}',
        "-n", f"{name}-{time.monotonic_ns()}@%h", "--without-gossip", "--without-mingle",
        "-l", "INFO"], env)
    proc.wait_log("ready.")
    return proc


def start_web(start_proc: Callable[..., Proc], env: dict[str, str]) -> str:
    """Start one gunicorn front-end process; return its ws:// URL."""
    port = free_port()
    start_web_on(start_proc, env, port)
    return f"ws://127.0.0.1:{port}/ws"


def start_web_on(start_proc: Callable[..., Proc], env: dict[str, str], port: int) -> Proc:
    """Start one gunicorn front end on ``port`` and wait until it answers."""
    proc = start_proc("web", [str(BIN / "gunicorn"), "-c", "python:app.gunicorn_conf",
                              "-k", "gevent", "-w", "1",
                              "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                              "app:create_app()"], env)

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"web exited:\n{proc.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return True
        except OSError:
            return False
    wait_for(healthy, 30, "the front end to answer /healthz")
    return proc


@pytest.fixture(scope="session")
def worker(start_proc: Callable[..., Proc], sluice_env: dict[str, str]) -> Proc:
    return start_worker(start_proc, sluice_env)


@pytest.fixture(scope="session")
def web(start_proc: Callable[..., Proc], sluice_env: dict[str, str], worker: Proc) -> str:
    return start_web(start_proc, sluice_env)


@pytest.fixture(scope="session")
def web2(start_proc: Callable[..., Proc], sluice_env: dict[str, str], worker: Proc) -> str:
    return start_web(start_proc, sluice_env)


class Client:
    """A real WebSocket client speaking Sluice's protocol."""

    def __init__(self, url: str, key: str | None = None, timeout_s: float = 20.0) -> None:
        header = [f"Authorization: Bearer {key}"] if key else []
        self.ws = websocket.create_connection(url, timeout=timeout_s, header=header)
        self.frames: list[dict[str, Any]] = []

    def send(self, **frame: Any) -> None:
        """Send one JSON frame."""
        self.ws.send(json.dumps(frame))

    def recv(self) -> dict[str, Any]:
        """Receive one frame."""
        frame = json.loads(self.ws.recv())
        self.frames.append(frame)
        return frame

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Receive frames until one matches ``predicate``; return it."""
        while True:
            frame = self.recv()
            if predicate(frame):
                return frame

    def finish(self, job_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        """Receive until every job in ``job_ids`` has ended; return each job's events."""
        ended = {f.get("job_id") for f in self.frames if f.get("type") in ("done", "error")}
        open_jobs = set(job_ids) - ended
        while open_jobs:
            frame = self.recv()
            if frame.get("type") in ("done", "error") and frame.get("job_id") in open_jobs:
                open_jobs.discard(frame["job_id"])
        return self.events()

    def events(self) -> dict[str, list[dict[str, Any]]]:
        """Frames received so far that belong to a job, grouped by job id."""
        out: dict[str, list[dict[str, Any]]] = {}
        for f in self.frames:
            if "seq" in f:
                out.setdefault(f["job_id"], []).append(f)
        return out

    def close(self) -> None:
        """Close the socket (even when the server closed it first)."""
        self.ws.close()
        self.ws.shutdown()


@pytest.fixture(scope="session")
def api_key(redis_server: RedisServer) -> str:
    """A key of the 'unlimited' tier, so that limits never get in the pipeline tests' way."""
    with redis.Redis.from_url(redis_server.url) as client:
        return KeyStore(client).create("tests", "unlimited")[0]


@pytest.fixture
def connect(api_key: str) -> Iterator[Callable[..., Client]]:
    """Open clients (authenticated with ``api_key`` unless told) that are closed after the test."""
    clients: list[Client] = []

    def open_client(url: str, key: str | None = api_key) -> Client:
        client = Client(url, key)
        clients.append(client)
        return client

    yield open_client
    for c in clients:
        c.close()


def text_of(events: list[dict[str, Any]]) -> str:
    """A job's text: its tokens after the last restart."""
    text = ""
    for e in events:
        if e["type"] == "restart":
            text = ""
        elif e["type"] == "token":
            text += e["text"]
    return text


# -- RabbitMQ as the Celery broker ---------------------------------------------------------------

#: The RabbitMQ the amqp tests use; the tests start none and skip when it does not answer.
AMQP_URL = os.environ.get("SLUICE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The test RabbitMQ's URL (``SLUICE_TEST_AMQP_URL``), or skip the test when it does not answer."""
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as e:  # noqa: BLE001 - whatever the reason, there is no broker to test on
        pytest.skip(f"no RabbitMQ answers at {AMQP_URL} ({e!r}); set SLUICE_TEST_AMQP_URL "
                    "to run the amqp broker tests")
    return AMQP_URL


@pytest.fixture(scope="module")
def amqp_env(sluice_env: dict[str, str], amqp_url: str) -> Iterator[dict[str, str]]:
    """The session's settings with RabbitMQ as the broker, on queues no other test run uses.

    Redis still keeps event logs, jobs and limits.  The queues are deleted
    afterwards (Celery declares them durable).
    """
    tag = uuid.uuid4().hex[:8]
    env = {**sluice_env, "SLUICE_BROKER_URL": amqp_url, "SLUICE_METRICS_PORT": "0",
           "SLUICE_QUEUE": f"sluice-test-{tag}", "SLUICE_BULK_QUEUE": f"sluice-test-{tag}-bulk"}
    yield env
    with Connection(amqp_url, connect_timeout=3) as conn:
        channel = conn.default_channel
        for queue in (env["SLUICE_QUEUE"], env["SLUICE_BULK_QUEUE"]):
            channel.queue_delete(queue)
