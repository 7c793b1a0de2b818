"""``sluice providers``: the provider deployments and their state, as every worker sees it.

Reads the providers file ``SLUICE_PROVIDERS`` names (or the one-deployment
default) and the shared state in the Redis at ``REDIS_URL``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click
import redis

from tasks.config import Settings
from tasks.deployments import ProvidersConfigError, load_providers
from tasks.routing import DeploymentState, Router


def _state(s: DeploymentState) -> str:
    if not s.cooldown_ms:
        return "healthy"
    until = time.strftime("%H:%M:%SZ", time.gmtime(time.time() + s.cooldown_ms / 1000))
    return f"cooling down until {until} ({s.cooldown_reason}, {s.cooldown_ms / 1000:.1f} s)"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per deployment.")
def providers(as_json: bool) -> None:
    """List the deployments: state, in flight, tokens this minute, moving TTFT.

    Example::

        $ sluice providers
        vllm-a   healthy  in flight 12  tokens/min 48210/2000000  ttft 182 ms  models llama-3-8b
    """
    settings = Settings.from_env()
    try:
        config = load_providers(settings)
    except ProvidersConfigError as e:
        raise click.ClickException(str(e)) from e
    client = redis.Redis.from_url(settings.redis_url)
    try:
        states = Router(client, config, settings.job_timeout_s).states()
    except redis.RedisError as e:
        raise click.ClickException(f"Redis at {settings.redis_url}: {e}") from e
    finally:
        client.close()
    width = max(len(n) for n in config.deployments)
    for s in states:
        dep = config.deployments[s.name]
        if as_json:
            click.echo(json.dumps({**asdict(s), "state": _state(s), "base_url": dep.base_url,
                                   "models": dict(dep.models), "tpm": dep.tpm, "rpm": dep.rpm}))
            continue
        tpm = f"/{dep.tpm}" if dep.tpm else ""
        ttft = f"{s.ttft_ms:.0f} ms" if s.ttft_ms is not None else "-"
        if s.provider_remaining_tokens is not None:
            tpm += f" (provider: {s.provider_remaining_tokens} left)"
        click.echo(f"{s.name:<{width}}  {_state(s)}  in flight {s.in_flight}  "
                   f"tokens/min {s.tokens_this_minute}{tpm}  ttft {ttft}  "
                   f"served {s.served}  failed {s.failed}  models {', '.join(dep.models)}")
