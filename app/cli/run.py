"""``sluice run``: the whole system on one machine, every process restarted when it dies."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

import click

from app.cli.dev.redis_server import answers
from app.cli.supervise import ProcfileError, Program, parse_concurrency, read_programs, render

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
PR_SET_PDEATHSIG = 1
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@click.command()
@click.option("--port", default=8000, show_default=True,
              help="Base port: web.1 gets it, each later Procfile line 100 more (as honcho).")
@click.option("-c", "--concurrency", default="", help="Processes per line, e.g. 'worker=4,web=2'.")
@click.option("--data-dir", envvar="SLUICE_DATA_DIR", default=".sluice", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Embedded Redis data, dev secrets, supervisord files [env SLUICE_DATA_DIR].")
def run(port: int, concurrency: str, data_dir: Path) -> None:
    """Start every process of the Procfile under supervisord, which restarts any that dies.

    Uses REDIS_URL when that Redis answers, else an embedded redis-server whose
    data (append-only file) lives in the data directory; starts the mock model
    unless OPENAI_BASE_URL is set. Announces the endpoints once every process
    answers.
    """
    data_dir = data_dir.resolve()
    env = dict(os.environ, SLUICE_DATA_DIR=str(data_dir))
    host = env.setdefault("SLUICE_HOST", "127.0.0.1")
    try:
        programs = read_programs(PROCFILE, parse_concurrency(concurrency), port)
    except (ProcfileError, OSError) as e:
        raise click.UsageError(str(e)) from e
    programs = _choose_dev_services(programs, env)
    busy = [f"{p} ({who})" for p, (bind, who) in _ports(programs, env, host).items()
            if not port_free(bind, p)]
    if busy:
        raise click.ClickException(
            f"port {', '.join(busy)} is already in use: stop what holds it (another "
            "`sluice run`?) or pick other ports with --port")
    env["SLUICE_DEV"] = env.get("SLUICE_DEV", "1")
    if env["SLUICE_DEV"] == "1":
        _dev_secrets(env, data_dir / "secrets.json")
        # The quickstart prints Flower's URL: let it show tasks (events cost ~1 ms per job).
        env.setdefault("SLUICE_TASK_EVENTS", "1")
    # The Procfile's commands live beside this interpreter (the venv's bin/).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    run_dir = data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = run_dir / "supervisord.conf"
    conf.write_text(render(programs, ROOT, run_dir))
    _append_only_stdout()
    click.echo(f"sluice: starting {', '.join(p.name for p in programs)} under supervisord "
               f"({conf})")
    sys.stdout.flush()
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)], env=env,
        stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()))

    def forward(signum: int, _: FrameType | None) -> None:
        supervisor.send_signal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    if _wait_ready(_readiness(programs, env), supervisor):
        _announce(programs, env, conf)
    sys.exit(supervisor.wait())


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as servers do, with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _choose_dev_services(programs: list[Program], env: dict[str, str]) -> list[Program]:
    """Point REDIS_URL / OPENAI_BASE_URL at the embedded services or drop those programs."""
    first = {p.kind: p for p in reversed(programs)}
    redis_url = env.get("REDIS_URL")
    if redis_url and answers(redis_url):
        click.echo(f"sluice: using Redis at {redis_url}")
        env["SLUICE_DEV_REDIS"] = "0"
        programs = [p for p in programs if p.kind != "redis"]
    elif "redis" in first:
        if redis_url:
            click.echo(f"sluice: REDIS_URL={redis_url} does not answer; starting an embedded "
                       "Redis")
        env["REDIS_URL"] = f"redis://127.0.0.1:{first['redis'].port}/0"
        env["SLUICE_DEV_REDIS"] = "1"
    if env.get("OPENAI_BASE_URL"):
        env["SLUICE_DEV_MOCK"] = "0"
        programs = [p for p in programs if p.kind != "mockllm"]
    elif "mockllm" in first:
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{first['mockllm'].port}/v1"
        env["SLUICE_DEV_MOCK"] = "1"
    return programs


def _ports(programs: list[Program], env: dict[str, str], host: str) -> dict[int, tuple[str, str]]:
    """Every port the processes will listen on -> (bind address, who)."""
    ports = {p.port: (host, p.name) for p in programs if p.listens_on_port}
    for kind, url in (("redis", env.get("REDIS_URL", "")), ("mockllm",
                                                           env.get("OPENAI_BASE_URL", ""))):
        dev = next((p for p in programs if p.kind == kind), None)
        if dev is not None:
            ports[urlparse(url).port or 0] = ("127.0.0.1", dev.name)
    return ports


def _dev_secrets(env: dict[str, str], path: Path) -> None:
    """Fill in the demo key and Flower's credentials, kept in a 0600 file across runs."""
    saved: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        saved = json.loads(path.read_text())
    from app.apikeys import KEY_PREFIX

    wanted: dict[str, Callable[[], str]] = {
        "SLUICE_DEMO_KEY": lambda: KEY_PREFIX + secrets.token_urlsafe(32),
        "SLUICE_FLOWER_USER": lambda: "admin",
        "SLUICE_FLOWER_PASSWORD": lambda: secrets.token_urlsafe(12)}
    for name, make in wanted.items():
        if not env.get(name):
            env[name] = saved.get(name) or make()
            saved[name] = env[name]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(saved, f, indent=1)


def _append_only_stdout() -> None:
    # supervisord reopens /dev/stdout for every process's output; when that is
    # a file, writes through a descriptor without O_APPEND would overwrite them.
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(1).st_mode):
            fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_APPEND)


def _die_with(parent: int) -> Callable[[], None]:
    def setup() -> None:
        # supervisord stops every process when told; a `kill -9` of this
        # command must tell it too, or the whole system would run on unseen.
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return setup


def _readiness(programs: list[Program], env: dict[str, str]) -> dict[str, Callable[[], bool]]:
    """A check per service: what must answer before the endpoints are announced."""
    connect = _connect_host(env["SLUICE_HOST"])
    checks: dict[str, Callable[[], bool]] = {}
    kinds = {p.kind for p in programs}
    if "redis" in kinds:
        checks["redis"] = lambda: answers(env["REDIS_URL"])
    if "mockllm" in kinds:
        models = env["OPENAI_BASE_URL"].rstrip("/") + "/models"
        checks["mock model"] = lambda: _http_ok(models)
    for p in programs:
        if p.kind == "web":
            checks[p.name] = _bind(_http_ok, f"http://{connect}:{p.port}/readyz")
        elif p.kind == "flower":
            auth = f"{env.get('SLUICE_FLOWER_USER', '')}:{env.get('SLUICE_FLOWER_PASSWORD', '')}"
            checks[p.name] = _bind(_http_ok, f"http://{connect}:{p.port}/healthcheck", auth)
    workers = sum(p.kind == "worker" for p in programs)
    if workers:
        checks["worker" if workers == 1 else f"{workers} workers"] = _workers_answer(env, workers)
    return checks


def _wait_ready(checks: dict[str, Callable[[], bool]], supervisor: subprocess.Popen[bytes],
                report_every_s: float = 15.0) -> bool:
    """Wait until every check passed once; False if supervisord exited first."""
    pending = dict(checks)
    next_report = time.monotonic() + report_every_s
    while pending:
        if supervisor.poll() is not None:
            return False
        for name, check in list(pending.items()):
            if check():
                del pending[name]
        if pending and time.monotonic() > next_report:
            click.echo(f"sluice: still waiting for {', '.join(pending)} to answer")
            next_report += report_every_s
        time.sleep(0.2)
    return True


def _announce(programs: list[Program], env: dict[str, str], conf: Path) -> None:
    show = _connect_host(env["SLUICE_HOST"])
    lines = []
    for p in programs:
        if p.kind == "web":
            lines += [f"WebSocket endpoint  ws://{show}:{p.port}/ws",
                      f"in the browser      http://{show}:{p.port}/",
                      f"health              http://{show}:{p.port}/readyz"]
    if env.get("SLUICE_DEMO_KEY"):
        lines.append(f"demo API key        {env['SLUICE_DEMO_KEY']}  (tier 'pro'; send it as "
                     "'Authorization: Bearer …' or in an 'auth' frame)")
    for p in programs:
        if p.kind == "flower":
            lines.append(f"Flower              http://{show}:{p.port}/ (user "
                         f"{env.get('SLUICE_FLOWER_USER', '')!r}, password "
                         f"{env.get('SLUICE_FLOWER_PASSWORD', '')!r})")
    if env.get("SLUICE_DEV_REDIS") == "1":
        lines.append(f"Redis               {env['REDIS_URL']} (embedded; data in "
                     f"{env['SLUICE_DATA_DIR']}/redis)")
    lines.append(f"processes           supervisorctl -c {conf} status")
    lines.append("ready")
    click.echo("\n".join(f"sluice: {line}" for line in lines))
    sys.stdout.flush()


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _bind(check: Callable[..., bool], *args: str) -> Callable[[], bool]:
    return lambda: check(*args)


def _http_ok(url: str, auth: str = "") -> bool:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with _NO_PROXY.open(req, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _workers_answer(env: dict[str, str], count: int) -> Callable[[], bool]:
    from celery import Celery

    from tasks.config import Settings

    app = Celery("sluice-run", broker=Settings.from_env(env).broker)
    seen: set[str] = set()

    def check() -> bool:
        try:
            for reply in app.control.ping(timeout=0.5) or ():
                seen.update(reply)
        except Exception:  # noqa: BLE001 - the broker may not be up yet
            return False
        if len(seen) >= count:
            app.close()
            return True
        return False
    return check
