"""What the parts Sluice is built on cost on this machine, each alone, per operation.

usage: .venv/bin/python docs/perf/floor.py [--n 2000]

Issue 9 asks for <= 1.5 ms of CPU per job summed over every Sluice process.  A
job needs at least one provider request through the ``openai`` SDK (over
httpx), one Celery message (publish, deliver, run, ack), a few Redis round
trips and a few WebSocket frames.  This prints what each of those costs with
nothing else around it, under gevent as Sluice runs them, so the floor of any
design built on these parts can be read off:

* ``openai`` SDK request: Sluice's provider path (``workers/provider.py``:
  ``client.post`` + the SDK's ``SSEDecoder``, a 1-token stream from the mock),
  and each further chunk of a 500-chunk stream on the same path,
  the SDK's documented ``chat.completions.create(stream=True)``, and httpx
  alone (the transport under the SDK), CPU of the client process only;
* Celery: a no-op task on a gevent worker over Redis, CPU of the worker per
  message (``acks_late``, task events off, as Sluice runs them), plus the
  sender's ``send_task``, and the wall time from the end of ``send_task`` (the
  message is on the broker) to the first line of the task, for a lone message:
  the hand-off every idle job waits for;
* one Redis round trip (``GET``) from redis-py under gevent, client CPU;
* one WebSocket text frame sent by ``simple_websocket`` (what flask-sock
  uses) to a reading client, sender CPU.

CPU is process time (user + system) from the kernel; each figure is the median
of 3 runs (the hand-off: the median of 40 messages sent 50 ms apart).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import httpx2  # noqa: E402
import openai  # noqa: E402
import redis  # noqa: E402

from app.cli.bench import cpu  # noqa: E402
from app.cli.dev.redis_server import RedisServer  # noqa: E402
from tasks.config import Settings  # noqa: E402
from workers.provider import Provider  # noqa: E402

MSGS = [{"role": "user", "content": "hello there"}]


def per_op(fn: Callable[[], None], n: int, runs: int = 3) -> float:
    """Median client CPU µs per call of ``fn`` over ``runs`` runs of ``n`` calls."""
    for _ in range(min(50, n)):
        fn()
    out = []
    for _ in range(runs):
        t = time.process_time()
        for _ in range(n):
            fn()
        out.append((time.process_time() - t) / n * 1e6)
    return statistics.median(out)


def start_mock(tokens: int) -> tuple[subprocess.Popen[str], str]:
    mock = subprocess.Popen([sys.executable, "-c", "from app.cli.dev.mockllm import serve, "
                             "MockConfig; serve(MockConfig(ttft_ms=0, itl_ms=0, "
                             f"output_tokens={tokens}), port=0)"], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert mock.stdout is not None
    return mock, mock.stdout.readline().split("listening on ", 1)[1].split()[0]


def sdk(n: int) -> dict[str, float]:
    mock, url = start_mock(1)
    long_mock, long_url = start_mock(500)
    try:
        ours = Provider(Settings(openai_base_url=url, provider_max_retries=0))
        client = openai.OpenAI(base_url=url, api_key="sk-none", max_retries=0)
        plain = httpx2.Client(base_url=url)
        body = {"model": "mock-1", "messages": MSGS, "max_tokens": 1, "stream": True,
                "stream_options": {"include_usage": True}}

        def sluice_path() -> None:
            with ours.stream("mock-1", MSGS, 1) as pieces:
                for _ in pieces:
                    pass
            gevent.sleep(0)  # let the drain hand the connection back

        def documented() -> None:
            for _ in client.chat.completions.create(
                    model="mock-1", messages=MSGS, max_tokens=1, stream=True,  # type: ignore[arg-type]
                    stream_options={"include_usage": True}):
                pass

        def httpx_alone() -> None:
            with plain.stream("POST", "/chat/completions", json=body) as r:
                for _ in r.iter_bytes():
                    pass

        long_ = Provider(Settings(openai_base_url=long_url, provider_max_retries=0))

        def chunks() -> None:
            with long_.stream("mock-1", MSGS, 500) as pieces:
                for _ in pieces:
                    pass
            gevent.sleep(0)

        per_request = per_op(sluice_path, n // 4)
        per_chunk = (per_op(chunks, max(3, n // 100)) - per_request) / 500
        return {"openai SDK request, Sluice's path": per_request,
                "openai SDK stream, Sluice's path: each further SSE chunk": per_chunk,
                "openai SDK request, chat.completions.create": per_op(documented, n // 4),
                "httpx request alone (under the SDK)": per_op(httpx_alone, n // 4)}
    finally:
        for m in (mock, long_mock):
            m.terminate()
            m.wait(10)


CELERY_APP = """
from celery import Celery
app = Celery("floor", broker="{url}")
app.conf.update(worker_send_task_events=False, task_acks_late=True,
                worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)

@app.task(name="noop", ignore_result=True)
def noop():
    pass

@app.task(name="stamp", ignore_result=True)
def stamp():
    import time, redis
    global r
    if "r" not in globals():
        r = redis.Redis.from_url("{url}")
    r.rpush("stamps", time.time())
"""


def celery_task(url: str, n: int) -> dict[str, float]:
    from celery import Celery

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "floorapp.py").write_text(CELERY_APP.format(url=url))
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "floorapp", "worker", "-P", "gevent", "-c",
             "100", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l",
             "WARNING"], cwd=tmp, env={**os.environ, "PYTHONPATH": tmp},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            app = Celery("floor", broker=url)
            r = redis.Redis.from_url(url)
            time.sleep(4)  # the worker starts

            def drained() -> None:
                while r.llen("celery") or r.hlen("unacked"):
                    time.sleep(0.05)
                time.sleep(0.3)

            app.send_task("noop")
            drained()
            send, work = [], []
            for _ in range(3):
                before = cpu.snapshot({"w": [worker.pid]})
                t = time.process_time()
                for _ in range(n):
                    app.send_task("noop")
                send.append((time.process_time() - t) / n * 1e6)
                drained()
                used = cpu.delta(before, cpu.snapshot({"w": [worker.pid]}))["w"]
                work.append(used / n * 1e6)
            # Latency of a lone message: on the broker -> the task's first line, 40 times.
            r.delete("stamps")
            sent = []
            for _ in range(40):
                app.send_task("stamp")
                sent.append(time.time())
                time.sleep(0.05)
            drained()
            lags = sorted((float(x) - t) * 1e6
                          for x, t in zip(r.lrange("stamps", 0, -1), sent, strict=True))
            return {"Celery send_task (sender)": statistics.median(send),
                    "Celery no-op task on a gevent worker (worker)": statistics.median(work),
                    "Celery hand-off of a lone message, on the broker -> task starts (wall, p50)":
                        lags[len(lags) // 2]}
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(20)


def redis_rtt(url: str, n: int) -> dict[str, float]:
    client = Settings(redis_url=url).redis_client()
    client.set("floor", "x")
    return {"Redis round trip, redis-py GET (client)": per_op(lambda: client.get("floor"), n)}


READER = """
import sys, simple_websocket
ws = simple_websocket.Client.connect(sys.argv[1])
n = 0
while True:
    if ws.receive() == "end":
        print(n, flush=True)
    else:
        n += 1
"""


def websocket_frame(n: int) -> dict[str, float]:
    from flask import Flask
    from flask_sock import Sock
    from gevent.pywsgi import WSGIServer
    from gevent.queue import Queue

    app = Flask("floor")
    sock = Sock(app)
    sockets: Queue = Queue()

    @sock.route("/ws")  # type: ignore[untyped-decorator]
    def ws_route(ws: object) -> None:
        done = gevent.event.Event()
        sockets.put((ws, done))
        done.wait()

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    reader = subprocess.Popen([sys.executable, "-c", READER,
                               f"ws://127.0.0.1:{server.server_port}/ws"],
                              stdout=subprocess.PIPE, text=True)
    try:
        ws, done = sockets.get(timeout=10)
        frame = json.dumps({"type": "token", "job_id": "0" * 32, "seq": 7, "text": " word"})
        out = []
        for _ in range(4):
            t = time.process_time()
            for _ in range(n):
                ws.send(frame)
            out.append((time.process_time() - t) / n * 1e6)
            ws.send("end")
            assert reader.stdout is not None
            reader.stdout.readline()
        done.set()
        return {"WebSocket text frame, flask-sock send (sender)": statistics.median(out[1:])}
    finally:
        reader.kill()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="operations per run")
    n = ap.parse_args().n
    figures: dict[str, float] = {}
    figures.update(sdk(n))
    with RedisServer() as server:
        figures.update(redis_rtt(server.url, n))
        figures.update(celery_task(server.url, n))
    figures.update(websocket_frame(n))
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for name, us in figures.items():
        print(f"{us:8.0f} µs  {name}")


if __name__ == "__main__":
    main()
