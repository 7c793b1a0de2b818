"""``sluice keys …`` and ``sluice usage``: manage API keys and read their usage.

Both talk to the Redis at ``REDIS_URL`` and validate tiers against the file
``SLUICE_TIERS_FILE`` names (or the built-in tiers).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click
import redis

from app.apikeys import ANONYMOUS_ID, KeyInfo, KeyNotFoundError, KeyStore
from app.tiers import TierConfigError, load_tiers
from tasks.budget import Budget
from tasks.config import Settings


def _redis() -> redis.Redis:
    return redis.Redis.from_url(Settings.from_env().redis_url)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


def _describe(info: KeyInfo) -> str:
    revoked = f"  revoked {_when(info.revoked_ms)}" if info.revoked_ms else ""
    return (f"{info.key_id}  {info.state:<7}  tier={info.tier}  name={info.name!r}  "
            f"created {_when(info.created_ms)}{revoked}")


@click.group()
def keys() -> None:
    """Create, list, show and revoke API keys."""


@keys.command("create")
@click.option("--tier", required=True, help="Tier whose limits the key gets, e.g. 'pro'.")
@click.option("--name", required=True, help="Who or what the key is for.")
def create(tier: str, name: str) -> None:
    """Create a key and print it.  It is shown only this once.

    Example::

        sluice keys create --tier pro --name alice
    """
    try:
        tiers = load_tiers(Settings.from_env().tiers_file or None)
    except TierConfigError as e:
        raise click.ClickException(str(e)) from e
    if tier not in tiers:
        raise click.BadParameter(f"unknown tier {tier!r}; known: {', '.join(sorted(tiers))}",
                                 param_hint="--tier")
    try:
        with _redis() as client:
            raw, info = KeyStore(client).create(name, tier)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    click.echo(raw)
    click.echo(f"created {_describe(info)}", err=True)
    click.echo("store this key now: Sluice keeps only its hash and cannot show it again",
               err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def list_keys(as_json: bool) -> None:
    """List every key, oldest first (never the keys themselves)."""
    with _redis() as client:
        infos = KeyStore(client).list()
    for info in infos:
        click.echo(json.dumps(asdict(info)) if as_json else _describe(info))


@keys.command("show")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def show(key_id: str, as_json: bool) -> None:
    """Show one key's record."""
    with _redis() as client:
        info = KeyStore(client).get(key_id)
    if info is None:
        raise click.ClickException(f"no API key with id {key_id!r}")
    click.echo(json.dumps(asdict(info)) if as_json else _describe(info))


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key: every later request or connection with it is refused."""
    try:
        with _redis() as client:
            info = KeyStore(client).revoke(key_id)
    except KeyNotFoundError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"revoked {_describe(info)}")


@click.command()
@click.argument("key_id")
@click.option("--days", default=7, show_default=True, type=click.IntRange(1, 366),
              help="How many UTC days back, today included.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per day.")
def usage(key_id: str, days: int, as_json: bool) -> None:
    """Show a key's daily usage: requests, refusals, prompt and completion tokens."""
    with _redis() as client:
        if key_id != ANONYMOUS_ID and KeyStore(client).get(key_id) is None:
            raise click.ClickException(f"no API key with id {key_id!r}")
        rows = Budget(client).usage(key_id, days)
    if as_json:
        for row in rows:
            click.echo(json.dumps(asdict(row)))
        return
    click.echo(f"{'day':<10}  {'requests':>8}  {'rejected':>8}  {'prompt':>10}  "
               f"{'completion':>10}  {'total':>10}")
    for row in rows:
        click.echo(f"{row.day:<10}  {row.requests:>8}  {row.rejected:>8}  "
                   f"{row.prompt_tokens:>10}  {row.completion_tokens:>10}  "
                   f"{row.prompt_tokens + row.completion_tokens:>10}")
