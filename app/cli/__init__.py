"""The ``sluice`` command: run the whole system, its dev services, and its tools."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

#: Subcommands whose modules load only when they run: the processes `sluice run`
#: starts (and restarts) should not pay for importing the bench and the openai SDK.
LAZY = {"keys": "app.cli.keys:keys", "usage": "app.cli.keys:usage",
        "bench": "app.cli.bench.cli:bench",
        "admission-bench": "app.cli.bench.admission:admission_bench",
        "bench-paths": "app.cli.bench.paths:bench_paths",
        "bench-scale": "app.cli.bench.scale:bench_scale",
        "run": "app.cli.run:run", "flower": "app.cli.flower:flower",
        "soak": "app.cli.soak.cli:soak", "batch": "app.cli.batch:batch",
        "providers": "app.cli.providers:providers"}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY:
            module, _, attr = LAZY[cmd_name].partition(":")
            command: Any = getattr(importlib.import_module(module), attr)
            return command  # type: ignore[no-any-return]
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup)
def main() -> None:
    """Sluice: a horizontally scaled LLM streaming gateway."""


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
@click.option("--data-dir", envvar="SLUICE_DATA_DIR", default=".sluice", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The data lives in DATA_DIR/redis [env SLUICE_DATA_DIR].")
def redis_cmd(dev_only: bool, data_dir: Path) -> None:
    """Become an embedded redis-server on REDIS_URL's port that keeps its data (AOF on)."""
    if dev_only and os.environ.get("SLUICE_DEV_REDIS") != "1":
        _idle("redis: using the external Redis at REDIS_URL")
    port = urlparse(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")).port or 6379
    data = data_dir.resolve() / "redis"
    click.echo(f"redis: embedded redis-server on 127.0.0.1:{port}, data in {data}")
    sys.stdout.flush()
    from app.cli.dev.redis_server import DataDirBusyError, exec_persistent

    try:
        exec_persistent(port, data)
    except DataDirBusyError as e:
        raise click.ClickException(str(e)) from e


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
@click.option("--retry-after-s", default=0.0, show_default=True,
              help="Retry-After sent with an injected 429 (0: none).")
@click.option("--cut-after", default=0, show_default=True,
              help="--fail-mode cut: drop the connection after this many tokens (0: halfway).")
@click.option("--ratelimit-tpm", default=0, show_default=True,
              help="Send x-ratelimit-*-tokens headers counting this many tokens a minute.")
def mockllm(dev_only: bool, host: str, port: int | None, ttft_ms: float, itl_ms: float,
            jitter_ms: float, output_tokens: int, fail_rate: float, fail_mode: str,
            models: str, retry_after_s: float, cut_after: int, ratelimit_tpm: int) -> None:
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
                            fail_mode=fail_mode, models=tuple(models.split(",")),
                            retry_after_s=retry_after_s, cut_after=cut_after,
                            ratelimit_tpm=ratelimit_tpm)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    serve(config, host, port)


def _idle(reason: str) -> None:
    # honcho (`honcho start`) stops every process when one exits, so a dev-only
    # service that is not needed waits quietly for the end instead.
    click.echo(f"{reason}; nothing to run here")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()
