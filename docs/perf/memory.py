"""RSS per idle authenticated socket in a front end, and per running stream in a worker.

usage: python docs/perf/memory.py [--sockets 1000] [--streams 1000] [--runs 3]
                                  [--only web|worker] [--trace DIR] [--deflate]

Starts a private stack (``app.cli.bench.stack``: embedded Redis, the mock model,
one Celery worker of ``-c streams+50``, one gunicorn front end), then:

* front end: RSS of the gunicorn *worker* process (``/proc/PID/status``) before
  and after a client process opens N WebSockets and authenticates each with an
  ``auth`` frame (answered ``authenticated``), divided by N; and again once the
  client has closed them all (does it come back?).
* worker: RSS of the Celery worker process with N running streams (the mock
  streams a long output, one token every 500 ms; every job has sent at least one
  token) against the same process idle, divided by N; and after the jobs are
  cancelled and gone.

The sockets are opened by a separate client process (asyncio ``websockets``), so
its memory is not counted.  Each run is printed; the first run also pays for
whatever the process allocates once (pools, lazily imported code).

``--deflate``: the front end's clients offer ``permessage-deflate`` (browsers
and the ``websockets`` library do by default); without it they offer no
extension.

``--trace DIR`` starts the front end with ``tracemalloc`` (25 frames) and writes
the top allocation sites of each run's "open" minus "before" snapshots to DIR
(the tracing itself inflates RSS: use it to find where, not how much).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HERE = Path(__file__).resolve()


def status(pid: int) -> dict[str, int]:
    """The process's memory lines of /proc/PID/status, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def settle(pid: int, quiet_s: float = 1.0, limit_s: float = 15.0) -> dict[str, int]:
    """RSS once it has not moved by more than 64 KiB for ``quiet_s``."""
    end = time.monotonic() + limit_s
    last = status(pid)
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = status(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) <= 64:
            return now
        last = now
    return last


# -- the client process -------------------------------------------------------


async def _client_web(url: str, key: str, n: int, deflate: bool = False) -> None:
    from websockets.asyncio.client import connect

    gate = asyncio.Semaphore(50)

    async def one(i: int) -> object:
        async with gate:
            ws = await connect(url, compression="deflate" if deflate else None, proxy=None,
                               ping_interval=None, open_timeout=60, close_timeout=5, max_size=2**20)
            await ws.send(json.dumps({"type": "auth", "ref": i, "key": key}))
            reply = json.loads(await ws.recv())
            assert reply["type"] == "authenticated", reply
            return ws

    socks = await asyncio.gather(*(one(i) for i in range(n)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(ws.close() for ws in socks))  # type: ignore[attr-defined]
    print("closed", flush=True)


async def _client_worker(url: str, key: str, n: int, per_socket: int) -> None:
    from websockets.asyncio.client import connect

    started: set[str] = set()
    jobs: dict[str, object] = {}
    all_running = asyncio.Event()
    stop = asyncio.Event()

    async def one(i: int) -> None:
        ws = await connect(url, compression=None, proxy=None, ping_interval=None,
                           open_timeout=60, close_timeout=5, max_size=2**24,
                           additional_headers={"Authorization": f"Bearer {key}"})
        count = min(per_socket, n - i * per_socket)
        for r in range(count):
            await ws.send(json.dumps({"type": "generate", "ref": r, "model": "mock-1",
                                      "prompt": "tell me a long story", "max_tokens": 4000}))
        mine: list[str] = []

        async def read() -> None:
            async for text in ws:
                frame = json.loads(text)
                kind = frame.get("type")
                if kind == "queued":
                    mine.append(frame["job_id"])
                    jobs[frame["job_id"]] = ws
                elif kind == "token" and frame["job_id"] not in started:
                    started.add(frame["job_id"])
                    if len(started) == n:
                        all_running.set()
                elif kind in ("error", "done") and not stop.is_set():
                    print("unexpected", text[:200], file=sys.stderr, flush=True)

        reader = asyncio.create_task(read())
        await stop.wait()
        for job_id in mine:
            await ws.send(json.dumps({"type": "cancel", "job_id": job_id}))
        await asyncio.sleep(1)
        reader.cancel()
        await ws.close()

    tasks = [asyncio.create_task(one(i)) for i in range(-(-n // per_socket))]
    await all_running.wait()
    print("running", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks)
    print("closed", flush=True)


# -- the measuring process ----------------------------------------------------


class Client:
    """The client process, driven line by line."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, str(HERE), "--client", *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def expect(self, word: str) -> None:
        assert self.p.stdout is not None
        line = self.p.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"client said {line!r}, expected {word!r}")

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("\n")
        self.p.stdin.flush()

    def wait(self) -> None:
        self.p.wait(60)


def kib(x: float) -> str:
    return f"{x:,.1f}"


def measure_web(url: str, key: str, pid: int, n: int, runs: int, trace: Path | None,
                deflate: bool = False) -> None:
    print(f"\nfront end: gunicorn worker pid {pid}, {n} idle authenticated sockets per run"
          + (", clients offering permessage-deflate" if deflate else ""))
    extra = ("deflate",) if deflate else ()
    print("run | RSS before KiB | open KiB | per socket KiB | closed KiB | kept per socket KiB"
          " | threads")
    # Warm-up: the relay, lazily imported code, the first socket's allocations.
    c = Client("web", url, key, "20", *extra)
    c.expect("ready")
    c.go()
    c.expect("closed")
    c.wait()
    for run in range(1, runs + 1):
        before = settle(pid)
        if trace:
            _snap(trace, f"before-{run}")
        c = Client("web", url, key, str(n), *extra)
        c.expect("ready")
        opened = settle(pid)
        nthreads = threads(pid)
        if trace:
            _snap(trace, f"open-{run}")
        c.go()
        c.expect("closed")
        c.wait()
        time.sleep(2)
        closed = settle(pid)
        b, o, z = before["VmRSS"], opened["VmRSS"], closed["VmRSS"]
        print(f"{run} | {b:,} | {o:,} | **{kib((o - b) / n)}** | {z:,} | {kib((z - b) / n)}"
              f" | {nthreads}", flush=True)


def measure_worker(url: str, key: str, pid: int, n: int, runs: int) -> None:
    print(f"\nworker: Celery worker pid {pid}, {n} running streams per run")
    print("run | RSS idle KiB | running KiB | per stream KiB | after KiB | kept per stream KiB")
    c = Client("worker", url, key, "20", "10")
    c.expect("running")
    c.go()
    c.expect("closed")
    c.wait()
    for run in range(1, runs + 1):
        time.sleep(2)
        idle = settle(pid)
        c = Client("worker", url, key, str(n), "20")
        c.expect("running")
        running = settle(pid)
        c.go()
        c.expect("closed")
        c.wait()
        time.sleep(3)
        after = settle(pid)
        i, r, a = idle["VmRSS"], running["VmRSS"], after["VmRSS"]
        print(f"{run} | {i:,} | {r:,} | **{kib((r - i) / n)}** | {a:,} | {kib((a - i) / n)}",
              flush=True)


def _snap(trace: Path, name: str) -> None:
    """Ask the traced front end for a snapshot (see ``docs/perf/memtrace_conf.py``)."""
    req = trace / f"{name}.req"
    req.write_text("")
    done = trace / f"{name}.done"
    end = time.monotonic() + 120
    while not done.exists():
        if time.monotonic() > end:
            raise RuntimeError("the traced front end did not write its snapshot")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=("web", "worker"))
    ap.add_argument("--trace", type=Path)
    ap.add_argument("--deflate", action="store_true")
    ap.add_argument("--client", nargs="+")
    args = ap.parse_args()
    if args.client:
        role, url, key, n, *rest = args.client
        if role == "web":
            asyncio.run(_client_web(url, key, int(n), deflate=rest == ["deflate"]))
        else:
            asyncio.run(_client_worker(url, key, int(n), int(rest[0])))
        return

    from app.cli.bench import cpu
    from app.cli.bench.config import StackOptions
    from app.cli.bench.stack import Stack

    env: list[tuple[str, str]] = [("SLUICE_CANCEL_ON_DISCONNECT", "1")]
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        env.append(("SLUICE_MEMTRACE_DIR", str(args.trace.resolve())))
    stack = Stack(StackOptions(workers=1, worker_concurrency=args.streams + 50, webs=1,
                               mock_ttft_ms=0, mock_itl_ms=500, mock_output_tokens=4000,
                               env=tuple(env)), model="mock-1", max_tokens_limit=4000)
    if args.trace:
        stack._spawn_web = _traced_web(stack)  # type: ignore[method-assign]
    try:
        stack.start()
        web_root = stack.roles()["web"][0]
        web = sorted(cpu.descendants([web_root]) - {web_root})[0]
        worker = stack.roles()["worker"][0]
        print(f"python {sys.version.split()[0]}, tree {ROOT}, "
              f"load average {os.getloadavg()[0]:.1f}")
        if args.only in (None, "web"):
            measure_web(stack.urls[0], stack.api_key, web, args.sockets, args.runs, args.trace,
                        args.deflate)
        if args.only in (None, "worker"):
            measure_worker(stack.urls[0], stack.api_key, worker, args.streams, args.runs)
    finally:
        stack.stop()


def _traced_web(stack: object) -> object:
    from app.cli.bench import stack as stack_mod

    def spawn(port: int) -> object:
        s = stack  # the Stack
        with s._lock:  # type: ignore[attr-defined]
            s._spawned += 1  # type: ignore[attr-defined]
            n = s._spawned  # type: ignore[attr-defined]
        return s._spawn(f"web{n}", [  # type: ignore[attr-defined]
            str(stack_mod.BIN / "gunicorn"), "-c", str(HERE.parent / "memtrace_conf.py"),
            "-k", "gevent", "-w", "1", "--worker-connections", "10000",
            "-b", f"127.0.0.1:{port}", "--graceful-timeout", "3", "--log-level", "warning",
            "app:create_app()"], {}, "web", stack_mod.signal.SIGTERM)
    return spawn


if __name__ == "__main__":
    main()
