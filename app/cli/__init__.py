"""The ``sluice`` command: run the whole system, its dev services, and its tools."""

from __future__ import annotations

import os
import secrets
import signal
import sys
from pathlib import Path
from urllib.parse import urlparse

import click

from app.cli.bench.admission import admission_bench
from app.cli.bench.cli import bench
from app.cli.bench.paths import bench_paths
from app.cli.dev.redis_server import RedisServer, answers, free_port
from app.cli.keys import keys, usage

ROOT = Path(__file__).resolve().parents[2]


@click.group()
def main() -> None:
    """Sluice: a horizontally scaled LLM streaming gateway."""


main.add_command(keys)
main.add_command(usage)
main.add_command(bench)
main.add_command(admission_bench)
main.add_command(bench_paths)


@main.command()
@click.option("--port", default=8000, show_default=True, help="First port of the web processes.")
@click.option("-c", "--concurrency", default="", help="honcho concurrency, e.g. 'worker=4,web=2'.")
def run(port: int, concurrency: str) -> None:
    """Start everything in the Procfile with honcho.

    Uses REDIS_URL when that Redis answers, else starts an embedded
    redis-server; starts the mock model unless OPENAI_BASE_URL is set.
    """
    env = dict(os.environ)
    redis_url = env.get("REDIS_URL")
    if redis_url and answers(redis_url):
        click.echo(f"sluice: using Redis at {redis_url}")
        env["SLUICE_DEV_REDIS"] = "0"
    else:
        if redis_url:
            click.echo(f"sluice: REDIS_URL={redis_url} does not answer; starting an embedded Redis")
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
        env["SLUICE_DEV_REDIS"] = "1"
    if env.get("OPENAI_BASE_URL"):
        env["SLUICE_DEV_MOCK"] = "0"
    else:
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{free_port()}/v1"
        env["SLUICE_DEV_MOCK"] = "1"
    env.setdefault("SLUICE_DEV", "1")
    # The Procfile's commands live beside this interpreter (the venv's bin/).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if env["SLUICE_DEV"] == "1" and not env.get("SLUICE_DEMO_KEY"):
        from app.apikeys import KEY_PREFIX

        env["SLUICE_DEMO_KEY"] = KEY_PREFIX + secrets.token_urlsafe(32)
    if env["SLUICE_DEV"] == "1" and not env.get("SLUICE_FLOWER_PASSWORD"):
        env["SLUICE_FLOWER_USER"] = env.get("SLUICE_FLOWER_USER", "admin")
        env["SLUICE_FLOWER_PASSWORD"] = secrets.token_urlsafe(12)
    click.echo(f"sluice: WebSocket endpoint  ws://127.0.0.1:{port}/ws")
    click.echo(f"sluice: in the browser      http://127.0.0.1:{port}/")
    click.echo(f"sluice: health              http://127.0.0.1:{port}/readyz")
    if env.get("SLUICE_DEMO_KEY"):
        click.echo(f"sluice: demo API key        {env['SLUICE_DEMO_KEY']}  (tier 'pro'; send it "
                   "as 'Authorization: Bearer …' or in an 'auth' frame)")
    click.echo(f"sluice: Flower              http://127.0.0.1:{port + 200}/ "
               f"(user {env.get('SLUICE_FLOWER_USER', 'admin')!r}, "
               f"password {env.get('SLUICE_FLOWER_PASSWORD', '')!r})")
    argv = ["honcho", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start", "-p", str(port)]
    if concurrency:
        argv += ["-c", concurrency]
    sys.stdout.flush()
    os.execvpe(sys.executable, [sys.executable, "-m", "honcho", *argv[1:]], env)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--bind", default="127.0.0.1:8000", show_default=True)
@click.option("--processes", "-w", default=1, show_default=True, help="gunicorn workers.")
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def web(bind: str, processes: int, gunicorn_args: tuple[str, ...]) -> None:
    """Run the front end under gunicorn with gevent workers.

    Sets up a fresh PROMETHEUS_MULTIPROC_DIR so /metrics adds up all processes.
    """
    import shutil
    import tempfile

    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="sluice-metrics-")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    gunicorn = Path(sys.executable).parent / "gunicorn"
    argv = [str(gunicorn), "-c", "python:app.gunicorn_conf", "-w", str(processes),
            "-b", bind, *gunicorn_args, "app:create_app()"]
    sys.stdout.flush()
    os.execve(str(gunicorn), argv, env)


@main.command("redis")
@click.option("--dev-only", is_flag=True, help="Idle unless SLUICE_DEV_REDIS=1.")
def redis_cmd(dev_only: bool) -> None:
    """Run an embedded redis-server on REDIS_URL's port (no persistence)."""
    if dev_only and os.environ.get("SLUICE_DEV_REDIS") != "1":
        _idle("redis: using the external Redis at REDIS_URL")
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    server = RedisServer(port=urlparse(url).port or 6379).start()
    click.echo(f"redis: embedded redis-server on {server.url}", err=False)
    def stop(*_: object) -> None:
        server.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        sys.exit(server.wait())
    finally:
        server.stop()


@main.command()
@click.option("--dev-only", is_flag=True, help="Idle unless SLUICE_DEV_MOCK=1.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="Default: OPENAI_BASE_URL's port, else 8001.")
@click.option("--ttft-ms", default=200.0, show_default=True)
@click.option("--itl-ms", default=100.0, show_default=True, help="Inter-token latency.")
@click.option("--jitter-ms", default=0.0, show_default=True)
@click.option("--output-tokens", default=50, show_default=True)
@click.option("--fail-rate", default=0.0, show_default=True)
@click.option("--fail-mode", type=click.Choice(["429", "500", "cut"]), default="500",
              show_default=True)
@click.option("--models", default="mock-1", show_default=True, help="Comma-separated.")
def mockllm(dev_only: bool, host: str, port: int | None, ttft_ms: float, itl_ms: float,
            jitter_ms: float, output_tokens: int, fail_rate: float, fail_mode: str,
            models: str) -> None:
    """Serve Sluice's OpenAI-compatible mock model."""
    if dev_only and os.environ.get("SLUICE_DEV_MOCK") != "1":
        _idle("mockllm: using the provider at OPENAI_BASE_URL")
    from gevent import monkey

    monkey.patch_all()
    from app.cli.dev.mockllm import MockConfig, serve

    if port is None:
        port = urlparse(os.environ.get("OPENAI_BASE_URL", "")).port or 8001
    try:
        config = MockConfig(ttft_ms=ttft_ms, itl_ms=itl_ms, jitter_ms=jitter_ms,
                            output_tokens=output_tokens, fail_rate=fail_rate,
                            fail_mode=fail_mode, models=tuple(models.split(",")))
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    serve(config, host, port)


def _idle(reason: str) -> None:
    # honcho stops every process when one exits, so a dev-only service that is
    # not needed waits quietly for the end instead.
    click.echo(f"{reason}; nothing to run here")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, flower_args: tuple[str, ...]) -> None:
    """Run Flower on Sluice's Celery app behind basic auth.

    Credentials come from SLUICE_FLOWER_USER and SLUICE_FLOWER_PASSWORD; without
    them Flower refuses to start unless SLUICE_DEV=1 (then it is open, on
    localhost only).
    """
    user = os.environ.get("SLUICE_FLOWER_USER", "")
    password = os.environ.get("SLUICE_FLOWER_PASSWORD", "")
    argv = ["celery", "-A", "workers.make_celery", "flower", f"--port={port}"]
    if user and password:
        argv.append(f"--basic_auth={user}:{password}")
    elif os.environ.get("SLUICE_DEV") == "1":
        argv.append("--address=127.0.0.1")
    else:
        raise click.UsageError("refusing to start Flower without SLUICE_FLOWER_USER and "
                               "SLUICE_FLOWER_PASSWORD (set SLUICE_DEV=1 to allow it on localhost)")
    celery = Path(sys.executable).parent / "celery"
    sys.stdout.flush()
    os.execv(str(celery), [str(celery), *argv[1:], *flower_args])
