"""``sluice bench`` against real parts: the mock model, a stack it starts itself, a running Sluice."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, Proc, start_mock, wait_for

BENCH = [sys.executable, "-m", "app.cli.bench"]


def bench(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``sluice bench`` as a user would, in a child process."""
    return subprocess.run([*BENCH, "--no-progress", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


def results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def step(data: dict[str, Any], label: str, target: str) -> dict[str, Any]:
    return next(s for s in data["steps"] if s["label"] == label and s["target"] == target)


def answers(url: str) -> bool:
    """Whether anything still accepts connections at the URL's host and port."""
    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname, u.port), timeout=0.5):
            return True
    except OSError:
        return False


def stack_gone(stack: dict[str, Any]) -> bool:
    """No port of the bench's stack answers and no worker of it is alive."""
    urls = [*stack["urls"], stack["mock_url"], stack["redis_url"]]
    names = stack["worker_names"]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(answers(u) for u in urls) and not any(n in ps for n in names)


@pytest.fixture(scope="module")
def timed_mock(start_proc: Callable[..., Proc]) -> str:
    """A mock with TTFT 100 ms and 20 ms between tokens."""
    return start_mock(start_proc, ttft_ms=100, itl_ms=20, output_tokens=20)[1]


def test_direct_mode_measures_the_mock_timing(timed_mock: str, tmp_path: Path) -> None:
    """TTFT and TPOT measured straight at the mock match its configured 100 ms and 20 ms."""
    run = bench("--direct", timed_mock, "--concurrency", "4",
                "--requests", "16", "--output-tokens", "20", "--verify-text", "count",
                "--slo", "ttft:1000 tpot:50", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    agg = step(results(tmp_path), "concurrency=4", "direct")["aggregate"]
    assert agg["ok"] == 16 and agg["errors"] == {} and agg["mismatch"] == 0
    assert 100 <= agg["ttft_ms"]["p50"] <= 150, agg["ttft_ms"]
    assert abs(agg["tpot_ms"]["p50"] - 20) <= 8, agg["tpot_ms"]
    assert abs(agg["itl_ms"]["p50"] - 20) <= 8, agg["itl_ms"]
    assert agg["goodput"]["requests"] == 16
    assert "concurrency=4 direct" in run.stdout and "TTFT p50" in run.stdout


def test_start_stack_reports_added_latency_cpu_and_files(tmp_path: Path) -> None:
    """A private stack, 20 sockets at once, over WebSocket and HTTP/SSE, compared with the mock: no loss, CPU per token, files."""
    run = bench("--start-stack", "--compare-direct", "--http", "--sockets", "20", "--webs", "2",
                "--mock-ttft-ms", "50", "--mock-itl-ms", "10", "--mock-output-tokens", "10",
                "--output-tokens", "10", "--worker-concurrency", "50", "--warmup", "2",
                "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    data = results(tmp_path)
    sluice, direct = step(data, "sockets=20", "sluice"), step(data, "sockets=20", "direct")
    http = step(data, "sockets=20", "http")  # the openai SDK against Sluice's /v1
    for s in (sluice, http, direct):
        agg = s["aggregate"]
        assert agg["ok"] == 20 and agg["errors"] == {}, agg["errors"]
        assert (agg["lost"], agg["dup"], agg["mismatch"]) == (0, 0, 0)
        assert agg["tokens"] == 200
    assert sluice["cpu"]["us_per_token"] > 0 and set(sluice["cpu"]["seconds"]) == {
        "redis", "worker", "web"}
    assert http["cpu"]["us_per_token"] > 0 and set(http["cpu"]["seconds"]) == {
        "redis", "worker", "web"}
    assert direct["cpu"] is None
    assert data["added"]["0"]["ttft_ms"]["p50"] is not None
    assert data["added_http"]["0"]["ttft_ms"]["p50"] is not None
    assert len(data["stack"]["urls"]) == 2  # sockets alternate between the two front ends
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["target"]) for r in rows] == [("sockets=20", "sluice"),
                                                         ("sockets=20", "http"),
                                                         ("sockets=20", "direct")]
    assert rows[1]["added_ttft_p50_ms"] != ""
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") >= 3 and "http://" not in html.split("<body>")[0]
    assert "<script" not in html and "<link" not in html and "<img" not in html
    assert "Added by Sluice" in run.stdout and "CPU us/tok" in run.stdout
    assert stack_gone(data["stack"])


def test_ctrl_c_reports_what_was_measured_and_stops_the_stack(tmp_path: Path) -> None:
    """SIGINT mid-step: exit 130, a summary and files for what finished, no process left."""
    proc = subprocess.Popen([*BENCH, "--start-stack", "--sockets", "10", "--sockets", "10",
                             "--mock-ttft-ms", "20", "--mock-itl-ms", "100",
                             "--mock-output-tokens", "200", "--output-tokens", "200",
                             "--warmup", "1", "--out", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # The progress line (every 2 s when stderr is not a terminal) says the step is running.
        wait_for(lambda: "[sockets=10 sluice]" in proc.stderr.readline(), 40, "the first step")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "sockets=10 sluice" in out
    data = results(tmp_path)
    assert data["interrupted"] and len(data["steps"]) == 1
    assert data["steps"][0]["aggregate"]["errors"] == {"interrupted": 10}
    assert data["steps"][0]["aggregate"]["ttft_ms"]["n"] == 10
    assert stack_gone(data["stack"])


def test_killed_bench_takes_its_stack_with_it(tmp_path: Path) -> None:
    """kill -9 of the bench: the kernel ends every process of its stack."""
    proc = subprocess.Popen([*BENCH, "--no-progress", "--start-stack", "--sockets", "5",
                             "--mock-itl-ms", "200",
                             "--warmup", "0", "--out", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        wait_for(lambda: "step(s)" in proc.stderr.readline(), 30, "the stack to start")
        logs = tmp_path / "logs"
        mock_line = (logs / "mock.log").read_text()
        mock_url = mock_line.split("listening on ", 1)[1].split()[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    ps = lambda: subprocess.run(["ps", "-eo", "args"], capture_output=True,  # noqa: E731
                                text=True).stdout
    wait_for(lambda: f"bench0-{proc.pid}@" not in ps() and not answers(mock_url), 15,
             "the stack to die with the bench")


def test_url_mode_against_a_running_sluice(web: str, api_key: str, tmp_path: Path) -> None:
    """--url with a Poisson load at the session's front end: every token arrives once, in order."""
    run = bench("--url", web, "--api-key", api_key, "--poisson", "20", "--burstiness", "0.5", "--requests", "12",
                "--connections", "3", "--output-tokens", "6", "--verify-text", "count",
                "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    agg = step(results(tmp_path), "poisson=20/s b=0.5", "sluice")["aggregate"]
    assert agg["ok"] == 12 and (agg["lost"], agg["dup"], agg["mismatch"]) == (0, 0, 0)
    assert agg["queue_ms"]["n"] == 12 and agg["ttft_ms"]["p50"] >= 40


def test_unreachable_targets_fail_with_one_clear_line() -> None:
    """A URL nobody answers: exit 2 and one line saying so, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        for args in (["--url", f"ws://127.0.0.1:{port}/ws"],
                     ["--direct", f"http://127.0.0.1:{port}/v1"]):
            run = bench(*args, "--sockets", "1")
            assert run.returncode == 2
            errors = [line for line in run.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1 and "connection refused" in errors[0], run.stderr
            assert "Traceback" not in run.stderr
    run = bench("--sockets", "1")
    assert run.returncode == 2 and "give exactly one target" in run.stderr


def test_a_wrong_api_key_is_named_not_traced(web: str) -> None:
    """The front end refuses the key: exit 2 with the server's reason."""
    run = bench("--url", web, "--api-key", "sk-wrong", "--sockets", "1")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "401" in run.stderr or "unauthorized" in run.stderr, run.stderr


SCALE = [sys.executable, "-c", "from app.cli import main; main()", "bench-scale", "--no-progress"]


def rst_columns(lines: list[str]) -> list[tuple[int, int]]:
    """The column spans of a reStructuredText simple table, checking every line fits them."""
    border = lines[0]
    assert set(border) == {"=", " "} and lines[-1] == border
    spans, start = [], None
    for i, ch in enumerate(border + " "):
        if ch == "=" and start is None:
            start = i
        elif ch == " " and start is not None:
            spans.append((start, i))
            start = None
    gaps = [i for (_, end), (nxt, _) in itertools.pairwise(spans) for i in range(end, nxt)]
    for line in lines:
        assert all(i >= len(line) or line[i] == " " for i in gaps), line  # no cell spills over
        assert len(line) <= len(border), line
    return spans


def rst_blocks(text: str) -> list[list[str]]:
    """Each simple table in ``text`` as its lines (from the first border to the last)."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("=="):
            block = [lines[i]]
            borders = 1
            while borders < 3:
                i += 1
                block.append(lines[i])
                borders += lines[i] == block[0]
            blocks.append(block)
        i += 1
    return blocks


def test_bench_scale_dry_run_lists_the_issue_matrix() -> None:
    """Without options: 8 idle cells (1/2/4/8 workers x 1/2 webs) and 12 scale cells, an estimate."""
    run = subprocess.run([*SCALE, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    cells = run.stdout.splitlines()
    assert len([c for c in cells if c.startswith("idle ")]) == 8
    assert len([c for c in cells if c.startswith("scale ")]) == 12
    assert "scale w=4 web=2 s=1000" in run.stdout and "idle w=8 web=2 s=1" in run.stdout
    assert "20 cell(s)" in run.stderr and "estimated" in run.stderr


def test_bench_scale_runs_a_tiny_matrix(tmp_path: Path) -> None:
    """1 worker x 1 web: an idle cell and scale cells of 1 and 3 sockets; rows, RST tables, JSON, CSV."""
    proc = subprocess.Popen([
        *SCALE, "--idle-workers", "1", "--idle-webs", "1", "--idle-requests", "3",
        "--idle-output-tokens", "3", "--scale-workers", "1", "--scale-webs", "1",
        "--scale-sockets", "1,3", "--mock-ttft-ms", "20", "--mock-itl-ms", "10",
        "--output-tokens", "10", "--worker-concurrency", "20", "--out", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "3 cell(s)" in err
    # One row per cell as it ends, then the two tables for the README.
    rows = [line.split() for line in out.splitlines() if line.startswith(("idle ", "scale "))]
    assert [r[:4] for r in rows] == [["idle", "1", "1", "1"], ["scale", "1", "1", "1"],
                                     ["scale", "1", "1", "3"]]
    tables = rst_blocks(out.split("reStructuredText for the README:", 1)[1])
    assert len(tables) == 2
    idle_table, scale_table = tables
    assert len(rst_columns(idle_table)) == 8 and len(rst_columns(scale_table)) == 10
    assert "added TTFT" in idle_table[1] and "CPU per job (ms)" in scale_table[1]
    body = scale_table[4:-1]
    assert [line.split()[:4] for line in body] == [["1", "1", "20", "1"], ["1", "1", "20", "3"]]
    assert all(line.count(" = ") == 2 for line in body)  # CPU per job and per token, summed

    data = json.loads((tmp_path / "scale.json").read_text())
    assert data["format"] == "sluice-bench-scale/1" and data["rst"] in out
    idle, one, three = data["cells"]
    assert (idle["part"], idle["workers"], idle["webs"], idle["sockets"]) == ("idle", 1, 1, 1)
    assert idle["requests"] == idle["ok"] >= 3 and idle["errors"] == 0
    assert (idle["lost"], idle["dup"], idle["mismatch"]) == (0, 0, 0)
    assert isinstance(idle["added_ttft_p50_ms"], float) and idle["tpot_ratio"] > 0
    assert list(idle["jobs_per_worker"].values()) == [idle["requests"]]  # one worker ran all
    assert idle["steps"]["jobs_per_worker_warm"] is not None
    assert min(idle["steps"]["jobs_per_worker_warm"].values()) >= 2  # warmed before measuring
    for cell, n in ((one, 1), (three, 3)):
        assert cell["part"] == "scale" and cell["sockets"] == n and cell["error"] is None
        assert cell["worker_concurrency"] == 20
        assert cell["requests"] == cell["ok"] == n and cell["errors"] == cell["job_errors"] == 0
        assert (cell["lost"], cell["dup"], cell["mismatch"]) == (0, 0, 0)
        jobs = cell["steps"]["jobs"]["sluice"]["aggregate"]
        assert jobs["ok"] == n and jobs["tokens"] == n  # the CPU-per-job step: 1-token jobs
        assert cell["steps"]["tokens"]["sluice"]["aggregate"]["tokens"] == 10 * n
        assert cell["steps"]["tokens"]["direct"]["aggregate"]["ok"] == n
        for key in ("cpu_ms_per_job", "cpu_us_per_token", "cpu_ms_per_job_net"):
            by = cell[key]
            assert set(by) == {"web", "worker", "redis", "total"}
            assert min(by.values()) >= 0
            assert by["total"] == pytest.approx(by["web"] + by["worker"] + by["redis"])
        assert isinstance(cell["added_ttft_p99_ms"], float) and cell["tpot_ratio"] > 0
    assert one["cpu_us_per_token"]["total"] + three["cpu_us_per_token"]["total"] > 0

    with (tmp_path / "scale.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["part"], r["sockets"]) for r in csv_rows] == [("idle", "1"), ("scale", "1"),
                                                            ("scale", "3")]
    assert csv_rows[2]["cpu_ms_per_job_worker"] != "" and csv_rows[2]["cpu_us_per_token_redis"]
    assert csv_rows[0]["jobs_per_worker"] == str(idle["requests"])
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"-{proc.pid}@localhost" not in ps  # every cell's stack was stopped
