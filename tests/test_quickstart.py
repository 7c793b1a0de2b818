"""The quickstart, ``sluice run``: everything up with nothing else running, and kept up."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import websocket

from app.cli.run import port_free
from tests.conftest import Client, wait_for

BIN = Path(sys.executable).parent
KINDS = ("web", "worker", "flower", "redis", "mockllm")  # Procfile order: PORT + 100 each
ALL = ("sluice:web.1", "sluice:worker.1", "sluice:flower.1", "redis.1", "mockllm.1")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _base_port() -> int:
    """A base port whose five Procfile ports are all free."""
    while True:
        base = random.randrange(20000, 60000)
        if all(port_free("127.0.0.1", base + 100 * i) for i in range(len(KINDS))):
            return base


def _get(url: str, auth: str = "") -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with _NO_PROXY.open(req, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code
    except OSError:
        return 0


@dataclass
class Run:
    """A running ``sluice run`` and what it printed."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    data_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def printed(self, label: str) -> str:
        """The first word after ``sluice: <label>`` in the output."""
        return self.log().split(f"sluice: {label}", 1)[1].split()[0]

    def wait_printed(self, needle: str, timeout_s: float = 90) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"sluice run exited:\n{self.log()[-5000:]}"
            return needle in self.log()
        wait_for(seen, timeout_s, f"sluice run to print {needle!r}")

    @property
    def conf(self) -> Path:
        return self.data_dir / "run" / "supervisord.conf"

    @property
    def flower_auth(self) -> str:
        secrets = json.loads((self.data_dir / "secrets.json").read_text())
        return f"{secrets['SLUICE_FLOWER_USER']}:{secrets['SLUICE_FLOWER_PASSWORD']}"

    def pid_of(self, program: str) -> int:
        """The pid supervisord runs ``program`` (e.g. ``web.1``) as; 0 while it is down."""
        out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), "pid", program],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return int(out) if out.isdigit() else 0

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]

    def restart(self) -> None:
        """Stop it, then start it again in the same directory on the same ports."""
        self.stop()
        self.log_path = self.log_path.with_name("again-" + self.log_path.name)
        self.proc = _start(self.data_dir.parent, self.port, self.log_path.stem).proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _start(tmp_path: Path, port: int | None = None, name: str = "run") -> Run:
    """Start ``sluice run`` with no REDIS_URL, OPENAI_BASE_URL or SLUICE_* set."""
    port = port or _base_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "OPENAI_BASE_URL") and not k.startswith("SLUICE_")}
    env.update(SLUICE_DATA_DIR=str(data_dir), SLUICE_WORKER_CONCURRENCY="50")
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "sluice"), "run", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=tmp_path)
    return Run(proc, port, log_path, data_dir)


def _job(run: Run, prompt: str = "hello", max_tokens: int = 3) -> tuple[str, list[dict]]:
    """Run one job with the demo key; return its id and events."""
    c = Client(f"ws://127.0.0.1:{run.port}/ws", run.printed("demo API key"))
    try:
        c.send(type="generate", prompt=prompt, max_tokens=max_tokens)
        job_id = c.until(lambda f: f.get("type") in ("queued", "error"))["job_id"]
        return job_id, c.finish({job_id})[job_id]
    finally:
        c.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One `sluice run` shared by the tests that only look at it or kill its processes."""
    run = _start(tmp_path_factory.mktemp("quickstart"))
    try:
        run.wait_printed("sluice: WebSocket endpoint")
        yield run
    finally:
        run.stop()


def test_sluice_run_announces_its_endpoint_only_once_every_service_answers(running: Run) -> None:
    """When the endpoint is printed, the first job already streams to done (no provider_unavailable)."""
    port = running.port
    # Checked the moment the line appears: nothing may still be starting.
    assert _get(f"http://127.0.0.1:{port + 400}/v1/models") == 200, "the mock model is not up"
    assert _get(f"http://127.0.0.1:{port}/readyz") == 200
    ev = _job(running)[1]
    assert ev[-1]["type"] == "done", ev[-1]
    assert ev[-1]["usage"]["completion_tokens"] == 3
    children = running.processes()
    assert any("redis-server" in " ".join(p.cmdline()) for p in children)


def test_everything_sluice_run_starts_listens_on_loopback_only(running: Run) -> None:
    """Web, worker metrics, Flower, Redis and the mock listen on 127.0.0.1, none on 0.0.0.0 or [::]."""
    running.wait_printed("sluice: ready")
    listening = {}
    for p in running.processes():
        for conn in p.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening[(conn.laddr.ip, conn.laddr.port)] = " ".join(p.cmdline())[:80]
    assert {port for _, port in listening} >= {running.port + 100 * i for i in range(len(KINDS))}
    exposed = {addr: who for addr, who in listening.items() if addr[0] != "127.0.0.1"}
    assert not exposed, exposed


def test_no_secret_is_on_any_command_line(running: Run) -> None:
    """Neither Flower's password nor the demo key shows in any process's argv (ps -eo args)."""
    password = running.flower_auth.split(":", 1)[1]
    demo_key = running.printed("demo API key")
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert password not in args
    assert demo_key not in args


def test_every_flower_page_needs_credentials_under_sluice_run(running: Run) -> None:
    """Flower's pages, API, /metrics and /healthcheck answer 401 without the printed credentials."""
    flower = f"http://127.0.0.1:{running.port + 200}"
    wait_for(lambda: _get(flower + "/healthcheck", running.flower_auth) == 200, 30, "Flower")
    for path in ("/", "/metrics", "/healthcheck", "/api/workers", "/nowhere"):
        assert _get(flower + path) == 401, path
        assert _get(flower + path, "admin:wrong") == 401, path
    assert _get(flower + "/metrics", running.flower_auth) == 200


@pytest.mark.parametrize("programs", [["redis.1"], ["mockllm.1"],
                                      ["sluice:web.1", "sluice:worker.1", "sluice:flower.1"]],
                         ids=["redis", "mock", "web+worker+flower"])
def test_sluice_run_restarts_processes_killed_with_sigkill(running: Run, programs: list[str]) -> None:
    """kill -9 of processes: supervisord starts them again and jobs run again; the rest stay up."""
    running.wait_printed("sluice: ready")
    pids = {p: running.pid_of(p) for p in ALL}
    for program in programs:
        os.kill(pids[program], signal.SIGKILL)
    for program in programs:
        wait_for(lambda p=program: running.pid_of(p) not in (0, pids[p]), 60,
                 f"{program} to restart")
    wait_for(lambda: _get(f"http://127.0.0.1:{running.port + 200}/healthcheck",
                          running.flower_auth) == 200, 60, "Flower to answer")

    def job_done() -> bool:
        try:
            return _job(running)[1][-1]["type"] == "done"
        except (OSError, KeyError, ValueError, IndexError, websocket.WebSocketException):
            return False  # a restarted process is still coming up
    wait_for(job_done, 60, f"a job to stream to done after {programs} were killed")
    assert running.proc.poll() is None
    assert {p: running.pid_of(p) for p in ALL if p not in programs} == \
        {p: pid for p, pid in pids.items() if p not in programs}, "another process was restarted"


def test_sluice_run_keeps_keys_jobs_and_usage_across_restarts(running: Run) -> None:
    """Stop `sluice run`, start it again: the demo key, a finished job's events and usage are still there."""
    running.wait_printed("sluice: ready")
    job_id, events = _job(running, "remember me", 4)
    assert events[-1]["type"] == "done"
    key = running.printed("demo API key")
    running.restart()
    running.wait_printed("sluice: ready")
    assert running.printed("demo API key") == key
    c = Client(f"ws://127.0.0.1:{running.port}/ws", key)
    try:
        c.send(type="resume", job_id=job_id, after=-1)
        replay = c.finish({job_id})[job_id]
    finally:
        c.close()
    assert replay == events
    req = urllib.request.Request(f"http://127.0.0.1:{running.port}/v1/usage",
                                 headers={"Authorization": f"Bearer {key}"})
    with _NO_PROXY.open(req, timeout=5) as resp:
        usage = json.loads(resp.read())
    assert sum(day["requests"] for day in usage["days"]) >= 2, usage


def test_sluice_run_refuses_a_busy_port_before_printing_endpoints(tmp_path: Path) -> None:
    """A port already taken: `sluice run` exits at once naming it, and announces nothing."""
    port = _base_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + 200))  # Flower's
        holder.listen()
        run = _start(tmp_path, port)
        try:
            code = run.proc.wait(30)
        finally:
            run.stop()
    out = run.log()
    assert code != 0
    assert f"port {port + 200} (flower.1) is already in use" in out, out
    assert "ws://" not in out
