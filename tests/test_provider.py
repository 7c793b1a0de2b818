"""The worker's provider client against the real mock model: kept-alive connections, error codes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from app.cli.dev.redis_server import free_port
from tasks.config import Settings
from tasks.runtime import Finish, ProviderError
from tests.conftest import Client, Proc, start_mock
from workers.provider import Provider


def mock_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.loads(resp.read())


def test_jobs_in_a_row_reuse_one_provider_connection(web: str, mock: str,
                                                     connect: Callable[[str], Client]) -> None:
    """Five jobs one after another open at most one new connection to the model."""
    c = connect(web)
    before = mock_stats(mock)
    for i in range(5):
        c.send(type="generate", prompt=f"keep alive {i}", max_tokens=2)
        job_id = c.until(lambda f: f.get("type") == "queued")["job_id"]
        assert c.finish({job_id})[job_id][-1]["type"] == "done"
    after = mock_stats(mock)
    assert after["streams_completed"] - before["streams_completed"] == 5
    # Each /mock/stats call is a connection of its own.
    assert after["connections"] - before["connections"] - 1 <= 1


def _stream(base_url: str) -> list[str | Finish]:
    provider = Provider(Settings(openai_base_url=base_url, provider_max_retries=0))
    try:
        with provider.stream("mock-1", [{"role": "user", "content": "hi"}], 8) as pieces:
            return list(pieces)
    finally:
        provider.close()


@pytest.mark.parametrize(("fail_mode", "code"), [("500", "provider_500"),
                                                 ("cut", "provider_stream_broken")])
def test_provider_failures_map_to_error_codes(start_proc: Callable[..., Proc], fail_mode: str,
                                              code: str) -> None:
    """An HTTP error before streaming is provider_<status>; a cut stream is provider_stream_broken."""
    _, url = start_mock(start_proc, ttft_ms=0, itl_ms=1, output_tokens=10, fail_rate=1.0,
                        fail_mode=fail_mode)
    with pytest.raises(ProviderError) as e:
        _stream(url)
    assert e.value.code == code


def test_unreachable_provider_is_provider_unavailable() -> None:
    """Nothing listening at the provider's address is provider_unavailable."""
    with pytest.raises(ProviderError) as e:
        _stream(f"http://127.0.0.1:{free_port()}/v1")
    assert e.value.code == "provider_unavailable"


_ROUNDS = """
from gevent import monkey; monkey.patch_all()
import json, sys, urllib.request, gevent
from tasks.config import Settings
from workers.provider import Provider
url, n = sys.argv[1], int(sys.argv[2])
provider = Provider(Settings(openai_base_url=url, provider_max_retries=0, worker_concurrency=500))
def one():
    with provider.stream("mock-1", [{"role": "user", "content": "hi"}], 1) as pieces:
        assert [type(p).__name__ for p in pieces] == ["str", "Finish"]
def connections():
    with urllib.request.urlopen(url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.loads(resp.read())["connections"]
news = []
for _ in range(4):
    before = connections()
    gevent.joinall([gevent.spawn(one) for _ in range(n)], raise_error=True)
    news.append(connections() - before - 1)
print(json.dumps(news))
"""


def test_concurrent_requests_keep_their_connections_on_a_busy_process(
        start_proc: Callable[..., Proc]) -> None:
    """Rounds of 200 concurrent requests on one saturated process reuse the connections of the first.

    The end of each body is read after the job ends, without a deadline a busy
    process would miss (it used to be 0.1 s: 30-40 % of requests then paid a new
    connection).
    """
    _, url = start_mock(start_proc, ttft_ms=0, itl_ms=0, output_tokens=1)
    out = subprocess.run([sys.executable, "-c", _ROUNDS, url, "200"], capture_output=True,
                         text=True, timeout=120, check=True)
    news = json.loads(out.stdout.strip().splitlines()[-1])
    assert news[0] == 200
    # Drains still running when the next round starts leave a few pools short.
    assert max(news[1:]) <= 20, news


_AFTER_IDLE_CLOSE = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from tasks.config import Settings
from workers.provider import Provider
provider = Provider(Settings(openai_base_url=sys.argv[1], provider_max_retries=0))
for _ in range(3):
    with provider.stream("mock-1", [{"role": "user", "content": "hi"}], 1) as pieces:
        print([type(p).__name__ for p in pieces], flush=True)
    gevent.sleep(0.5)  # the server closes the idle connection meanwhile
"""

_SSE = (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        b"data: [DONE]\n\n")


def test_a_connection_the_provider_closed_while_idle_is_not_reused() -> None:
    """A kept-alive connection the server closed is noticed before a request is sent on it.

    The server closes each connection 0.1 s after its response (as a proxy's
    keep-alive timeout would); with no retries, a request sent on the dead
    connection would fail.
    """
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(_SSE), _SSE))
            time.sleep(0.1)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        out = subprocess.run([sys.executable, "-c", _AFTER_IDLE_CLOSE, url], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.splitlines() == ["['str', 'Finish']"] * 3
        assert len(accepted) == 3
    finally:
        listener.close()
