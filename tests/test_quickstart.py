"""The two-command quickstart: ``sluice run`` brings up everything, with nothing else running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

from app.cli.dev.redis_server import free_port
from tests.conftest import Client, wait_for

BIN = Path(sys.executable).parent


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return json.loads(resp.read())["status"] == "ok"
    except OSError:
        return False


def test_sluice_run_serves_a_job_with_embedded_redis_and_mock(tmp_path: Path) -> None:
    """With no REDIS_URL and no OPENAI_BASE_URL, `sluice run` starts Redis and the mock itself."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "OPENAI_BASE_URL") and not k.startswith("SLUICE_")}
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([str(BIN / "sluice"), "run", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (proc.poll() is None and _ready(port)) or proc.poll() is not None, 60,
                 "sluice run to become ready")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()
        printed = (tmp_path / "run.log").read_text()
        demo_key = printed.split("demo API key", 1)[1].split()[0]
        c = Client(f"ws://127.0.0.1:{port}/ws", demo_key)
        try:
            c.send(type="generate", prompt="hello", max_tokens=3)
            job_id = c.recv()["job_id"]
            ev = c.finish({job_id})[job_id]
        finally:
            c.close()
        assert ev[-1]["type"] == "done", ev[-1]
        assert ev[-1]["usage"]["completion_tokens"] == 3
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(p.cmdline()) for p in children), [p.cmdline() for p in children]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
