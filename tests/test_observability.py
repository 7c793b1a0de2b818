"""Per-job metrics, Prometheus endpoints and Flower, against the running system."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import redis

from app.cli.dev.redis_server import free_port
from tasks import keys
from tasks.config import Settings
from tasks.queue import make_celery
from tests.conftest import Client, Proc, wait_for

BIN = Path(sys.executable).parent


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        e.close()
        return e.code, body


def _sample(text: str, name: str, default: float | None = None) -> float:
    """The value of the first sample line starting with ``name`` (``default`` when none)."""
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no sample {name!r} in:\n{text[:2000]}")


def _run_job(web: str, connect: Callable[[str], Client], prompt: str = "observe me") -> dict:
    c = connect(web)
    c.send(type="generate", prompt=prompt, max_tokens=6)
    job_id = c.recv()["job_id"]
    return c.finish({job_id})[job_id][-1]


def test_done_carries_every_per_job_metric(web: str, mock: str, r: redis.Redis,
                                           connect: Callable[[str], Client]) -> None:
    """done.metrics has queue wait, provider and client TTFT, TPOT, ITL, E2E, deployment, attempts."""
    done = _run_job(web, connect)
    m = done["metrics"]
    assert set(m) == {"queue_wait_ms", "provider_ttft_ms", "client_ttft_ms", "tpot_ms",
                      "itl_p50_ms", "itl_max_ms", "generation_ms", "e2e_ms", "deployment",
                      "attempts", "tried"}
    record = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(done["job_id"])).items()}
    # What the job's record holds, the metrics repeat exactly.
    assert m["queue_wait_ms"] == int(record["started_ms"]) - int(record["created_ms"])
    assert m["client_ttft_ms"] == float(record["client_ttft_ms"])
    assert m["deployment"] == urlparse(mock).netloc
    assert m["attempts"] == 1
    assert m["tried"] == [m["deployment"]]
    # The session's mock: first token after 40 ms, then one every 15 ms (6 tokens).
    assert 40 <= m["provider_ttft_ms"] <= m["generation_ms"] <= m["e2e_ms"]
    assert m["generation_ms"] >= 40 + 5 * 15
    assert 5 <= m["tpot_ms"] <= 60
    assert 0 < m["itl_p50_ms"] <= m["itl_max_ms"]


def test_front_end_metrics_count_sockets_and_ttft(web: str, connect: Callable[[str], Client]) -> None:
    """/metrics on the front end counts each open socket and each job's client-facing TTFT once."""
    url = web.replace("ws://", "http://").replace("/ws", "/metrics")
    # Sockets of earlier tests are closed, but the server may not have seen it yet.
    wait_for(lambda: _sample(_get(url)[1], "sluice_open_sockets") == 0, 10,
             "earlier tests' sockets to be closed")
    before = _sample(_get(url)[1], "sluice_client_ttft_seconds_count", 0.0)
    _run_job(web, connect)
    status, text = _get(url)
    assert status == 200
    assert _sample(text, "sluice_client_ttft_seconds_count") == before + 1
    assert _sample(text, "sluice_open_sockets") == 1  # the test's own socket
    assert "sluice_requests_rejected_total" in text


def test_worker_metrics_count_jobs_and_tokens(web: str, connect: Callable[[str], Client],
                                              sluice_env: dict[str, str]) -> None:
    """The worker's /metrics counts each finished job and its output tokens, and samples the queue depth."""
    url = f"http://127.0.0.1:{sluice_env['SLUICE_METRICS_PORT']}/metrics"
    wait_for(lambda: _sample(_get(url)[1], "sluice_jobs_in_flight") == 0, 20,
             "earlier tests' jobs to end")
    before = _get(url)[1]
    _run_job(web, connect)
    status, text = _get(url)
    assert status == 200
    for name, added in (('sluice_jobs_total{outcome="done"}', 1),
                        ('sluice_tokens_total{direction="out"}', 6),
                        ("sluice_e2e_seconds_count", 1)):
        assert _sample(text, name) == _sample(before, name, 0.0) + added, name
    assert "sluice_provider_ttft_seconds_bucket" in text
    wait_for(lambda: 'sluice_queue_depth{queue="sluice"}' in _get(url)[1], 10, "a queue depth sample")


@pytest.fixture(scope="module")
def flower(start_proc: Callable[..., Proc], sluice_env: dict[str, str], worker: Proc) -> str:
    port = free_port()
    # Task events are off by default; with them on, Flower turns them on in the
    # workers every few seconds: the fixture does it now so the first job is seen.
    env = {**sluice_env, "SLUICE_FLOWER_USER": "ops", "SLUICE_FLOWER_PASSWORD": "s3cret",
           "SLUICE_DEV": "0", "SLUICE_TASK_EVENTS": "1"}
    celery = make_celery(Settings.from_env(sluice_env))
    # Replies can take seconds on a loaded machine: wait for them, not 1 s.
    wait_for(lambda: celery.control.enable_events(reply=True, timeout=5), 30,
             "the worker to turn its task events on")
    celery.close()
    proc = start_proc("flower", [str(BIN / "sluice"), "flower", "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.popen.poll() is not None or _get_ok(url), 30, "Flower to answer")
    assert proc.popen.poll() is None, proc.log()
    return url


def _get_ok(url: str) -> bool:
    try:
        return _get(url + "/healthcheck", ("ops", "s3cret"))[0] == 200
    except OSError:
        return False


def test_every_flower_page_needs_credentials(flower: str) -> None:
    """Pages, API, static files, /metrics and /healthcheck all answer 401 without the credentials."""
    paths = ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks", "/metrics",
             "/healthcheck", "/static/css/flower.css", "/login", "/no/such/page")
    for path in paths:
        status, _ = _get(flower + path)
        assert status == 401, path
        assert _get(flower + path, ("ops", "wrong"))[0] == 401, path
    assert _get(flower + "/metrics", ("ops", "s3cret"))[0] == 200
    assert _get(flower + "/healthcheck", ("ops", "s3cret")) == (200, "OK")


def test_flower_listens_on_loopback_and_keeps_its_password_off_the_command_line(
        flower: str) -> None:
    """Flower binds 127.0.0.1 only (not 0.0.0.0 or [::]) and no argv carries the password."""
    port = int(flower.rsplit(":", 1)[1])
    owner = [p for p in psutil.process_iter() if any(
        c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in _connections(p))]
    assert owner, "no process listens on Flower's port"
    addresses = {c.laddr.ip for p in owner for c in _connections(p)
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert addresses == {"127.0.0.1"}, addresses
    assert "s3cret" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                          text=True).stdout


def _connections(p: psutil.Process) -> list:
    try:
        return p.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_worker_metrics_listen_on_loopback_only(worker: Proc, sluice_env: dict[str, str]) -> None:
    """The worker's Prometheus port is bound to 127.0.0.1, not to every interface."""
    port = int(sluice_env["SLUICE_METRICS_PORT"])
    wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics")[0] == 200, 20, "worker metrics")
    addresses = {c.laddr.ip for c in psutil.Process(worker.popen.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert addresses == {"127.0.0.1"}, addresses


def test_flower_requires_auth_and_shows_workers_and_tasks(
        flower: str, web: str, connect: Callable[[str], Client]) -> None:
    """Flower answers 401 without credentials; with them it lists workers and id-only tasks."""
    assert _get(flower + "/api/workers")[0] == 401
    auth = ("ops", "s3cret")
    workers = wait_for(lambda: json.loads(_get(flower + "/api/workers?refresh=1", auth)[1]), 20,
                       "Flower to see a worker")
    assert workers
    _run_job(web, connect, prompt="a secret prompt for flower")

    def generation_tasks() -> list[dict]:
        tasks = json.loads(_get(flower + "/api/tasks", auth)[1])
        return [t for t in tasks.values() if t.get("name") == "sluice.generate"
                and t.get("state") == "SUCCESS"]
    tasks = wait_for(generation_tasks, 20, "Flower to see a finished generation task")
    shown = json.dumps(tasks)
    assert "a secret prompt" not in shown
    assert all(len(json.loads(t["args"].replace("'", '"'))) == 1 for t in tasks)


def test_flower_refuses_to_start_without_credentials(sluice_env: dict[str, str]) -> None:
    """Outside dev mode, Flower without credentials exits with a clear message."""
    env = {k: v for k, v in sluice_env.items()}
    env.update({"SLUICE_DEV": "0", "PATH": str(BIN)})
    out = subprocess.run([str(BIN / "sluice"), "flower", "--port", str(free_port())], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "SLUICE_FLOWER_PASSWORD" in out.stderr


def test_flower_is_read_only_by_default(flower: str, worker: Proc, sluice_env: dict[str, str]) -> None:
    """Flower's shutdown and pool buttons reach the workers but change nothing."""
    auth = ("ops", "s3cret")
    names = wait_for(lambda: list(json.loads(_get(flower + "/api/workers?refresh=1", auth)[1])), 20,
                     "Flower to see a worker")
    name = names[0]
    req = urllib.request.Request(f"{flower}/api/worker/shutdown/{name}", method="POST",
                                 headers={"Authorization": "Basic "
                                          + base64.b64encode(b"ops:s3cret").decode()})
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
        e.close()
    wait_for(lambda: "pidbox command error: KeyError('shutdown')" in worker.log(), 10,
             "the worker to refuse the command")
    assert worker.popen.poll() is None, "the worker obeyed a shutdown from Flower"
