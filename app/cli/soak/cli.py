"""``sluice soak``: hours of mixed load on a private stack, watching memory and Redis keys."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import redis

from app.cli.bench.config import BenchError, StackOptions
from app.cli.bench.stack import Stack
from app.cli.soak.audit import held, keys_without_ttl
from app.cli.soak.sampler import Sampler
from app.cli.soak.streams import Fleet

MODEL = "mock-1"
#: A limited tier, so a slot or reservation that leaks is visible in Redis.
TIERS = """
[tiers.soak]
tokens_per_minute = 100_000_000
requests_per_minute = 10_000_000
max_concurrent_jobs = {slots}
max_prompt_tokens = 1_000
max_output_tokens = 200
default_output_tokens = 50
"""


def _mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        if name not in ("plain", "cancel", "drop"):
            raise click.BadParameter(f"unknown action {name!r} (plain, cancel, drop)")
        mix[name] = float(weight or 1)
    return mix


@click.command()
@click.option("--minutes", default=30.0, show_default=True, help="How long to send jobs.")
@click.option("--streams", default=200, show_default=True, help="Concurrent client streams.")
@click.option("--workers", default=2, show_default=True)
@click.option("--webs", default=2, show_default=True)
@click.option("--worker-concurrency", default=300, show_default=True)
@click.option("--mix", "mix_text", default="plain=8,cancel=1,drop=1", show_default=True,
              help="Weights of job kinds: plain, cancel (after 3 tokens), drop (disconnect "
                   "after 3 tokens, reconnect elsewhere, resume).")
@click.option("--sample-every-s", default=60.0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.json here (and keep the stack's logs).")
def soak(minutes: float, streams: int, workers: int, webs: int, worker_concurrency: int,
         mix_text: str, sample_every_s: float, out: Path | None) -> None:
    """Run mixed load for MINUTES on a private stack; print memory slopes and leftovers.

    Exits 1 when a token was lost or repeated, a text was wrong, a job never
    ended, a slot or reservation was left held, or a Sluice key (other than API
    keys) was left without a TTL.

    Example::

        sluice soak --minutes 2        # a smoke run
    """
    mix = _mix(mix_text)
    log_dir = out / "stack" if out else Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tiers = log_dir / "tiers.toml"
    tiers.write_text(TIERS.format(slots=streams + 50))
    opts = StackOptions(workers=workers, worker_concurrency=worker_concurrency, webs=webs,
                        mock_ttft_ms=200, mock_itl_ms=100, mock_output_tokens=60,
                        env=(("SLUICE_TIERS_FILE", str(tiers)),))
    stack = Stack(opts, model=MODEL, log_dir=log_dir)
    try:
        stack.start()
        report = _soak(stack, minutes, streams, mix, sample_every_s)
    except BenchError as e:
        raise click.ClickException(str(e)) from e
    finally:
        stack.stop()
    if out:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


def _soak(stack: Stack, minutes: float, streams: int, mix: dict[str, float],
          sample_every_s: float) -> dict[str, object]:
    client = redis.Redis.from_url(stack.redis_url)
    from app.apikeys import KeyStore

    key, info = KeyStore(client).create("soak", "soak")
    fleet = Fleet(lambda: list(stack.urls), key, MODEL, streams, max_tokens=(20, 40, 60),
                  mix=mix)
    sampler = Sampler(stack)
    stop = threading.Event()

    def sample_forever() -> None:
        while True:
            sampler.sample()
            if stop.wait(sample_every_s):
                return
    thread = threading.Thread(target=sample_forever, name="soak-sampler", daemon=True)
    click.echo(f"soak: {streams} streams for {minutes:g} min over {len(stack.urls)} front "
               f"ends and {len(stack.worker_names)} workers; mix {mix}", err=True)
    t0 = time.monotonic()
    thread.start()
    tally = asyncio.run(fleet.run(minutes * 60, 60))
    stop.set()
    thread.join()
    sampler.sample()
    elapsed_min = (time.monotonic() - t0) / 60
    summary = tally.summary(stack.mock_config)
    deadline = time.monotonic() + 15
    while any(held(client, info.key_id).values()) and time.monotonic() < deadline:
        time.sleep(0.5)  # the last settles land just after the last events
    leftovers = held(client, info.key_id)
    no_ttl = keys_without_ttl(client)
    client.close()
    sampler.close()
    slopes = {name: s.slope_mb_per_min() for name, s in sampler.series.items()}
    verdicts = summary["verdicts"]
    assert isinstance(verdicts, dict)
    bad = {v: n for v, n in verdicts.items() if v in ("open", "wrong_text")}
    ok = (not bad and not summary["lost_events"] and not summary["duplicated_events"]
          and not any(leftovers.values()) and not no_ttl)
    _print(summary, sampler, slopes, leftovers, no_ttl, elapsed_min)
    return {"ok": ok, "minutes": elapsed_min, "streams": streams, "mix": mix, **summary,
            "memory": {n: {"points": s.points, "slope_mb_per_min": slopes[n]}
                       for n, s in sampler.series.items()},
            "held": leftovers, "keys_without_ttl": no_ttl}


def _print(summary: dict[str, object], sampler: Sampler, slopes: dict[str, float | None],
           leftovers: dict[str, list[str]], no_ttl: list[str], elapsed_min: float) -> None:
    click.echo(f"soak: {elapsed_min:.1f} min, {summary['jobs']} jobs "
               f"{json.dumps(summary['verdicts'])}, refused {json.dumps(summary['refused'])}, "
               f"{summary['tokens']} tokens, {summary['resumes']} resumes, "
               f"{summary['restarts']} restarts; lost {summary['lost_events']}, "
               f"duplicated {summary['duplicated_events']}")
    click.echo(f"{'process':<32} {'first MB':>9} {'last MB':>9} {'MB/min':>8}")
    for name, series in sorted(sampler.series.items()):
        slope = slopes[name]
        click.echo(f"{name:<32} {series.points[0][1]:9.1f} {series.points[-1][1]:9.1f} "
                   f"{'-' if slope is None else f'{slope:+8.2f}':>8}")
    click.echo("held after the run: " + ", ".join(f"{k} {len(v)}" for k, v in leftovers.items()))
    click.echo(f"sluice keys without a TTL (besides API keys): {len(no_ttl)}"
               + (f": {', '.join(no_ttl[:10])}" if no_ttl else ""))
