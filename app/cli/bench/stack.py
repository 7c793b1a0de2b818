"""A private Sluice for ``--start-stack``: Redis, the mock model, Celery workers, gunicorn.

Every child runs in its own session (a terminal's Ctrl-C reaches only the
bench, which then tears down in order) and is told by the kernel to die
with the bench (``PR_SET_PDEATHSIG``), so even a ``kill -9`` of the bench
leaves no process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.cli.bench.config import BenchError, StackOptions
from app.cli.dev.mockllm import MockConfig
from app.cli.dev.redis_server import answers, find_redis_server, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1


def _child_setup(parent: int, death_signal: int) -> Callable[[], None]:
    def setup() -> None:
        os.setsid()
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:  # the bench died before prctl took effect
            os._exit(1)
    return setup


class Child:
    """One child process (and its process group) writing to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 death_signal: int = signal.SIGKILL) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_child_setup(os.getpid(), death_signal))

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def check(self) -> None:
        """Raise if the process has exited.

        :raises BenchError: with the end of its log.
        """
        if self.popen.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.popen.returncode}:\n"
                             f"{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        """The last lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def send(self, sig: int) -> None:
        """Send ``sig`` to the process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, first: int = signal.SIGTERM, grace_s: float = 5.0) -> None:
        """Signal the process group, wait ``grace_s``, then kill whatever is left of it."""
        self.send(first)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.send(signal.SIGKILL)
        self.popen.wait()


class Stack:
    """Starts and stops a complete Sluice on loopback ports.

    Example::

        stack = Stack(StackOptions(workers=2), model="mock-1")
        try:
            stack.start()
            ...  # stack.urls, stack.mock_url, stack.roles()
        finally:
            stack.stop()
    """

    def __init__(self, opts: StackOptions, model: str, log_dir: Path | None = None,
                 max_tokens_limit: int = 4096) -> None:
        self.opts = opts
        self.model = model
        self.max_tokens_limit = max_tokens_limit
        self._own_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-")) if log_dir is None \
            else log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.mock_config = MockConfig(ttft_ms=opts.mock_ttft_ms, itl_ms=opts.mock_itl_ms,
                                      jitter_ms=opts.mock_jitter_ms,
                                      output_tokens=opts.mock_output_tokens, models=(model,))
        self.redis_url = ""
        self.mock_url = ""
        self.urls: list[str] = []
        self.worker_names: list[str] = []
        #: A key of the 'unlimited' tier, so admission never throttles the load.
        self.api_key = ""
        self.children: dict[str, list[Child]] = {"redis": [], "mock": [], "worker": [],
                                                 "web": []}
        self._spawned = 0
        #: Guards children, urls and worker names: a chaos loop adds and kills
        #: processes from its own threads.
        self._lock = threading.Lock()
        self._url_of: dict[int, str] = {}
        self._serving: set[int] = set()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="stack-spawner")

    def start(self, deadline_s: float = 60.0) -> None:
        """Start everything and wait until each part answers.

        :raises BenchError: a part failed to start (its log's end is in the message).
        """
        end = time.monotonic() + deadline_s
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._spawn("redis", [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(self.log_dir),
                              "--maxclients", "20000", "--loglevel", "warning"], {})
        self._wait(lambda: answers(self.redis_url, 0.2), "redis", end)
        self.api_key = _bench_key(self.redis_url)
        o = self.opts
        mock = self._spawn("mock", [sys.executable, "-c", "from app.cli import main; main()",
                                    "mockllm", "--port", "0", "--ttft-ms", str(o.mock_ttft_ms),
                                    "--itl-ms", str(o.mock_itl_ms), "--jitter-ms",
                                    str(o.mock_jitter_ms), "--output-tokens",
                                    str(o.mock_output_tokens), "--models", self.model], {})
        self._wait(lambda: "listening on " in mock.log_path.read_text(errors="replace"),
                   "mock", end)
        line = mock.log_path.read_text().split("listening on ", 1)[1]
        self.mock_url = line.split()[0]
        names = [self._spawn_worker()[0] for _ in range(o.workers)]
        ports = [free_port() for _ in range(o.webs)]
        for p in ports:
            self._spawn_web(p)
        self._wait_workers(names, end)
        for p in ports:
            self._wait(functools.partial(_http_ok, f"http://127.0.0.1:{p}/readyz"), "web", end)
        self.urls = [f"ws://127.0.0.1:{p}/ws" for p in ports]
        self._url_of = {c.pid: u for c, u in zip(self.children["web"], self.urls, strict=True)}
        self.worker_names = names
        self._serving = {c.pid for role in ("web", "worker") for c in self.children[role]}

    def add_worker(self, deadline_s: float = 60.0) -> Child:
        """Start one more worker process and wait until it answers; safe from any thread.

        :raises BenchError: it did not start in time.
        """
        name, child = self._spawn_worker()
        self._wait_workers([name], time.monotonic() + deadline_s, child)
        with self._lock:
            if child in self.children["worker"]:
                self.worker_names.append(name)
                self._serving.add(child.pid)
        return child

    def add_web(self, deadline_s: float = 60.0) -> str:
        """Start one more front end on a free port; return its URL once it is ready.

        Safe from any thread; the URL joins :attr:`urls` only if the process was
        not killed meanwhile.

        :raises BenchError: it did not become ready in time.
        """
        port = free_port()
        child = self._spawn_web(port)
        self._wait(functools.partial(_http_ok, f"http://127.0.0.1:{port}/readyz"), "web",
                   time.monotonic() + deadline_s, child)
        url = f"ws://127.0.0.1:{port}/ws"
        with self._lock:
            if child in self.children["web"]:
                self.urls.append(url)
                self._url_of[child.pid] = url
                self._serving.add(child.pid)
        return url

    def kill(self, child: Child) -> None:
        """``kill -9`` a child's process group and forget it; safe from any thread."""
        with self._lock:
            for kids in self.children.values():
                if child in kids:
                    kids.remove(child)
            url = self._url_of.pop(child.pid, None)
            if url in self.urls:
                self.urls.remove(url)
            self._serving.discard(child.pid)
        child.send(signal.SIGKILL)
        child.popen.wait()

    def serving(self, role: str) -> list[Child]:
        """The role's processes that finished starting and were not killed."""
        with self._lock:
            return [c for c in self.children[role] if c.pid in self._serving]

    def describe(self) -> dict[str, Any]:
        """What was started, for the results file."""
        o = self.opts
        return {"workers": o.workers, "worker_concurrency": o.worker_concurrency,
                "webs": o.webs, "mock": {"ttft_ms": o.mock_ttft_ms, "itl_ms": o.mock_itl_ms,
                                         "jitter_ms": o.mock_jitter_ms,
                                         "output_tokens": o.mock_output_tokens},
                "urls": self.urls, "mock_url": self.mock_url, "redis_url": self.redis_url,
                "worker_names": self.worker_names, "env": dict(o.env)}

    def roles(self) -> dict[str, list[int]]:
        """Root pids of Sluice's own processes by role (not the mock's)."""
        return {role: [c.pid for c in kids] for role, kids in self.children.items()
                if role != "mock"}

    def mock_pids(self) -> list[int]:
        """Pids of the mock model."""
        return [c.pid for c in self.children["mock"]]

    def stop(self) -> None:
        """Stop every part (front ends first, Redis last); safe to call twice."""
        # Workers hold nothing worth a warm shutdown here (the Redis is private).
        for role, first in (("web", signal.SIGTERM), ("worker", signal.SIGKILL),
                            ("mock", signal.SIGTERM), ("redis", signal.SIGTERM)):
            for child in self.children[role]:
                child.send(first)
            for child in self.children[role]:
                child.stop(first)
            self.children[role] = []
        self._spawner.shutdown()
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "REDIS_URL": self.redis_url, "OPENAI_BASE_URL": self.mock_url,
               "OPENAI_API_KEY": "sk-bench", "SLUICE_MODELS": self.model,
               "SLUICE_QUEUE": "sluice",
               "SLUICE_WORKER_CONCURRENCY": str(self.opts.worker_concurrency),
               "SLUICE_MAX_TOKENS_LIMIT": str(self.max_tokens_limit)}
        for var in ("SLUICE_BROKER_URL", "CELERY_BROKER_URL"):
            env.pop(var, None)
        env.update(dict(self.opts.env))
        return env

    def _spawn_worker(self) -> tuple[str, Child]:
        with self._lock:
            self._spawned += 1
            n = self._spawned
        name = f"bench{n}-{os.getpid()}@localhost"
        return name, self._spawn(f"worker{n}", [
            str(BIN / "celery"), "-A", "workers.make_celery", "worker", "-P", "gevent",
            "-c", str(self.opts.worker_concurrency), "-Q", "sluice", "-n", name,
            "--without-gossip", "--without-mingle", "-l", "WARNING"], {}, "worker")

    def _spawn_web(self, port: int) -> Child:
        with self._lock:
            self._spawned += 1
            n = self._spawned
        return self._spawn(f"web{n}", [
            str(BIN / "gunicorn"), "-c", "python:app.gunicorn_conf", "-k", "gevent", "-w", "1",
            "--worker-connections",
            "10000", "--backlog", "4096", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "3",
            "--log-level", "warning", "app:create_app()"], {}, "web", signal.SIGTERM)

    def _spawn(self, name: str, argv: list[str], extra: dict[str, str], role: str = "",
               death_signal: int = signal.SIGKILL) -> Child:
        # The kernel's parent-death signal fires when the *thread* that started a
        # child ends: start every child from one thread that lives as long as the stack.
        child = self._spawner.submit(Child, name, argv, {**self._env(), **extra}, self.log_dir,
                                     death_signal).result()
        with self._lock:
            self.children[role or name].append(child)
        return child

    def _wait(self, ready: Callable[[], bool], role: str, end: float,
              only: Child | None = None) -> None:
        while True:
            with self._lock:
                kids = [only] if only else list(self.children[role])
            for child in kids:
                child.check()
            if ready():
                return
            if time.monotonic() > end:
                tails = "\n".join(f"{c.name}:\n{c.tail()}" for c in self.children[role])
                raise BenchError(f"the stack's {role} did not become ready in time:\n{tails}")
            time.sleep(0.05)

    def _wait_workers(self, names: list[str], end: float, only: Child | None = None) -> None:
        from celery import Celery  # imported only when a stack is started

        app = Celery("sluice-bench", broker=self.redis_url)
        seen: set[str] = set()

        def ready() -> bool:
            for reply in app.control.ping(destination=names, timeout=0.3) or ():
                seen.update(reply)
            return seen >= set(names)
        try:
            self._wait(ready, "worker", end, only)
        finally:
            app.close()


def _bench_key(redis_url: str) -> str:
    import redis

    from app.apikeys import KeyStore

    with redis.Redis.from_url(redis_url) as client:
        return KeyStore(client).create("sluice-bench", "unlimited")[0]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
