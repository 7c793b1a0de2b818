"""``sluice batch``: submit a JSONL file as a batch and follow it, over HTTP with the openai SDK.

Example::

    export SLUICE_API_KEY=sk-sluice-…
    sluice batch submit prompts.jsonl --wait     # prints the batch id, then a live progress bar
    sluice batch status batch_…
    sluice batch results batch_… -o out.jsonl    # errors, if any, to out.errors.jsonl
    sluice batch cancel batch_…
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import openai

F = TypeVar("F", bound=Callable[..., Any])
FINAL = ("completed", "failed", "cancelled", "expired")
BAR = 30


def _connection(f: F) -> F:
    f = click.option("--api-key", envvar="SLUICE_API_KEY", required=True,
                     help="The key to act as (default: $SLUICE_API_KEY).")(f)
    f = click.option("--url", envvar="SLUICE_URL", default="http://127.0.0.1:8000",
                     show_default=True, help="The front end (default: $SLUICE_URL).")(f)
    return f


def _client(url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=2)


@click.group()
def batch() -> None:
    """Batch jobs: many chat completions from one JSONL file, run as the key's limits allow."""


@batch.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar until it ends.")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE",
              help="Metadata to attach (repeatable).")
@_connection
def submit(file: Path, wait: bool, metadata: tuple[str, ...], url: str, api_key: str) -> None:
    """Upload FILE (lines of {"custom_id", "method", "url", "body"}) and start a batch.

    Prints the batch id.  Exits 1 if the file fails validation, or with --wait
    if the batch does not complete.
    """
    meta = dict(m.split("=", 1) for m in metadata if "=" in m) or None
    client = _client(url, api_key)
    with _api_errors():
        with file.open("rb") as f:
            upload = client.files.create(file=(file.name, f), purpose="batch")
        created = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata=meta)
    click.echo(created.id)
    _report_errors(created)
    if created.status == "failed":
        sys.exit(1)
    if wait:
        final = _follow(client, created.id)
        _summary(final)
        sys.exit(0 if final.status == "completed" else 1)


@batch.command()
@click.argument("batch_id")
@_connection
def status(batch_id: str, url: str, api_key: str) -> None:
    """Print a batch's status, counts, held requests and files as JSON."""
    with _api_errors():
        b = _client(url, api_key).batches.retrieve(batch_id)
    extra = (b.model_extra or {}).get("sluice") or {}
    click.echo(json.dumps({
        "id": b.id, "status": b.status,
        "request_counts": b.request_counts.model_dump() if b.request_counts else None,
        "held": extra.get("held"), "running": extra.get("running"),
        "next_eta_s": extra.get("next_eta_s"), "last_eta_s": extra.get("last_eta_s"),
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "errors": [e.model_dump() for e in b.errors.data or []] if b.errors else []}, indent=2))


@batch.command()
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the results (JSONL, one line per completed request).")
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write failed requests (default: OUTPUT with .errors.jsonl).")
@_connection
def results(batch_id: str, output: Path, errors: Path | None, url: str, api_key: str) -> None:
    """Download an ended batch's results (and its failed requests, if any)."""
    client = _client(url, api_key)
    with _api_errors():
        b = client.batches.retrieve(batch_id)
        if b.status not in FINAL:
            raise click.ClickException(f"batch {batch_id} is {b.status}; results come when "
                                       "it ends (try --wait on submit, or status)")
        written = []
        if b.output_file_id:
            output.write_bytes(client.files.content(b.output_file_id).content)
            written.append(str(output))
        if b.error_file_id:
            errors = errors or output.with_suffix(".errors.jsonl")
            errors.write_bytes(client.files.content(b.error_file_id).content)
            written.append(str(errors))
    counts = b.request_counts
    click.echo(f"{b.status}: {counts.completed if counts else 0} completed, "
               f"{counts.failed if counts else 0} failed; wrote {', '.join(written) or 'nothing'}")


@batch.command()
@click.argument("batch_id")
@_connection
def cancel(batch_id: str, url: str, api_key: str) -> None:
    """Cancel a batch: held requests never start, running ones stop, results so far stay."""
    with _api_errors():
        b = _client(url, api_key).batches.cancel(batch_id)
    click.echo(f"{b.id}: {b.status}")


@contextmanager
def _api_errors() -> Iterator[None]:
    """Turn the SDK's errors into one line on stderr and exit code 1."""
    try:
        yield
    except openai.APIStatusError as e:
        raise click.ClickException(f"{e.status_code}: {e.message}") from e
    except openai.APIConnectionError as e:
        raise click.ClickException(f"cannot reach Sluice: {e}") from e


def _report_errors(b: Any) -> None:
    for e in (b.errors.data or [])[:20] if b.errors else []:
        where = f"line {e.line}: " if e.line else ""
        click.echo(f"{where}{e.code}: {e.message}", err=True)


def _follow(client: openai.OpenAI, batch_id: str, every_s: float = 0.5) -> Any:
    """Poll the batch until it ends, drawing a progress line on stderr."""
    samples: list[tuple[float, int]] = []
    while True:
        with _api_errors():
            b = client.batches.retrieve(batch_id)
        counts = b.request_counts
        total, done, failed = ((counts.total, counts.completed, counts.failed) if counts
                               else (0, 0, 0))
        now = time.monotonic()
        samples = [s for s in samples if now - s[0] <= 10] + [(now, done + failed)]
        rate = (samples[-1][1] - samples[0][1]) / (now - samples[0][0]) \
            if now > samples[0][0] else 0.0
        left = total - done - failed
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        held = ((b.model_extra or {}).get("sluice") or {}).get("held")
        filled = round(BAR * (done + failed) / total) if total else BAR
        click.echo(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {done + failed}/{total}  "
                   f"done {done}  failed {failed}  {rate:.1f}/s  ETA {eta}"
                   + (f"  held {held}" if held else "") + "   ", err=True, nl=False)
        if b.status in FINAL:
            click.echo("", err=True)
            return b
        time.sleep(every_s)


def _summary(b: Any) -> None:
    counts = b.request_counts
    click.echo(f"{b.id}: {b.status}, {counts.completed} completed, {counts.failed} failed"
               + (f"; results: sluice batch results {b.id} -o results.jsonl"
                  if b.output_file_id or b.error_file_id else ""))
