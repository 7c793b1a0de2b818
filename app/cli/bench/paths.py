"""Client TTFT at one stream: the mock directly, Sluice's WebSocket, Sluice's HTTP API.

Starts a private stack (``sluice bench``'s), then sends requests one at a
time, in blocks of ten rotating over the three paths, and prints each path's
TTFT (request sent -> first token read) percentiles, what Sluice adds over
the mock, and the front end's CPU per request (the gunicorn processes'
CPU time over the path's blocks: on a busy machine the latency
figures wander, the CPU figure much less).  The clients are minimal
(``http.client``, ``websocket-client``) so their own cost stays out::

    sluice bench-paths --requests 60
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import click
import websocket

from app.cli.bench.config import StackOptions
from app.cli.bench.stack import Stack


def connect(url: str) -> http.client.HTTPConnection:
    """A keep-alive HTTP connection to ``url``'s host."""
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)


def sse_ttft(conn: http.client.HTTPConnection, key: str, model: str, prompt: str,
             path: str) -> float:
    """Stream one chat completion on a kept-alive connection; seconds to the first text."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 3, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", path, body, {"Authorization": f"Bearer {key}",
                                      "Content-Type": "application/json"})
    resp = conn.getresponse()
    ttft = None
    for line in resp:
        if ttft is None and line.startswith(b"data: {"):
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    assert ttft is not None
    return ttft


def ws_ttft(ws: websocket.WebSocket, prompt: str) -> float:
    """Generate on an open socket; seconds to the first token."""
    t0 = time.perf_counter()
    ws.send(json.dumps({"type": "generate", "prompt": prompt, "max_tokens": 3}))
    ttft = None
    while True:
        frame = json.loads(ws.recv())
        if ttft is None and frame["type"] == "token":
            ttft = time.perf_counter() - t0
        if frame["type"] in ("done", "error"):
            assert ttft is not None, frame
            return ttft


def cpu_s(pids: list[int]) -> float:
    """CPU seconds run so far by ``pids``, their children (gunicorn's workers) and threads."""
    total_ns = 0
    for pid in pids:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        for p in [pid, *map(int, children)]:
            for task in os.listdir(f"/proc/{p}/task"):
                total_ns += int(open(f"/proc/{p}/task/{task}/schedstat").read().split()[0])
    return total_ns / 1e9


@click.command("bench-paths")
@click.option("--requests", default=60, show_default=True, type=click.IntRange(min=10),
              help="Requests per path.")
@click.option("--mock-ttft-ms", default=100.0, show_default=True)
def bench_paths(requests: int, mock_ttft_ms: float) -> None:
    """Client TTFT at one stream: the mock directly, Sluice's WebSocket, its HTTP API."""
    stack = Stack(StackOptions(mock_ttft_ms=mock_ttft_ms, mock_itl_ms=20,
                               mock_output_tokens=3), model="mock-1")
    stack.start()
    try:
        ws_url = stack.urls[0]
        http_url = ws_url.replace("ws://", "http://").removesuffix("/ws")
        ws = websocket.create_connection(ws_url, header=[f"Authorization: Bearer "
                                                         f"{stack.api_key}"])
        mock, sluice = connect(stack.mock_url), connect(http_url)
        mock_path = urlsplit(stack.mock_url).path + "/chat/completions"
        paths: dict[str, Callable[[str], float]] = {
            "direct": lambda p: sse_ttft(mock, "sk-x", "mock-1", p, mock_path),
            "websocket": lambda p: ws_ttft(ws, p),
            "http": lambda p: sse_ttft(sluice, stack.api_key, "mock-1", p,
                                       "/v1/chat/completions"),
        }
        for send in paths.values():  # warm up: imports, connections, encodings
            send("warm up")
        web = stack.roles()["web"]
        ttfts: dict[str, list[float]] = {name: [] for name in paths}
        cpu = dict.fromkeys(paths, 0.0)
        for block in range(0, requests, 10):
            # gunicorn closes a connection idle for 2 s (its keepalive): reconnect.
            mock.close()
            sluice.close()
            for name, send in paths.items():
                before = cpu_s(web)
                for i in range(block, min(block + 10, requests)):
                    ttfts[name].append(send(f"request {i}") * 1000)
                cpu[name] += cpu_s(web) - before
        ws.close()
    finally:
        stack.stop()
    direct = statistics.median(ttfts["direct"])
    click.echo(f"{'path':<10} {'p50 ms':>8} {'p90 ms':>8} {'added p50 ms':>13} "
          f"{'web CPU ms/request':>19}")
    for name, values in ttfts.items():
        q = statistics.quantiles(values, n=10)
        p50 = statistics.median(values)
        click.echo(f"{name:<10} {p50:8.1f} {q[8]:8.1f} {p50 - direct:13.1f} "
              f"{cpu[name] * 1000 / len(values):19.2f}")


if __name__ == "__main__":
    bench_paths()
