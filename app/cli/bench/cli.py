"""The ``sluice bench`` command."""

from __future__ import annotations

import asyncio
import resource
import sys
from pathlib import Path
from typing import Any

import click

from app.cli.bench.config import (
    KINDS,
    BenchConfig,
    BenchError,
    StackOptions,
    build_steps,
    parse_slo,
    parse_sweep,
)
from app.cli.bench.files import write_files
from app.cli.bench.output import print_summary
from app.cli.bench.runner import BenchResult, Runner
from app.cli.bench.stack import Stack

AUTO = "auto"


def _stack_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Celery worker processes (with --start-stack)."),
        click.option("--worker-concurrency", default=500, show_default=True,
                     type=click.IntRange(min=1),
                     help="Greenlets per worker process (-c)."),
        click.option("--webs", default=1, show_default=True, type=click.IntRange(min=1),
                     help="gunicorn front-end processes; sockets are spread over them."),
        click.option("--mock-ttft-ms", default=200.0, show_default=True),
        click.option("--mock-itl-ms", default=100.0, show_default=True),
        click.option("--mock-jitter-ms", default=0.0, show_default=True),
        click.option("--mock-output-tokens", default=50, show_default=True),
        click.option("--stack-env", multiple=True, metavar="VAR=VALUE",
                     help="Extra environment for the stack's processes (repeatable)."),
    ]):
        f = opt(f)
    return f


@click.command("bench")
@click.option("--url", "urls", multiple=True, metavar="WS_URL",
              help="Sluice WebSocket endpoint, e.g. ws://127.0.0.1:8000/ws (repeat to spread "
                   "sockets over several front ends).")
@click.option("--direct", "direct_url", metavar="BASE_URL",
              help="Any OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1.")
@click.option("--start-stack", is_flag=True,
              help="Start a private Sluice (Redis, mock model, workers, front ends) and stop "
                   "it at exit.")
@click.option("--compare-direct", is_flag=False, flag_value=AUTO, default=None,
              metavar="[BASE_URL]",
              help="Also send the same load straight to the model and report Sluice's added "
                   "latency (with --start-stack the URL defaults to the stack's mock).")
@click.option("--http", is_flag=True,
              help="Also run each step through Sluice's OpenAI-compatible HTTP API "
                   "(/v1/chat/completions streamed as SSE, with the openai SDK) on the same "
                   "front ends, and report its added latency beside the WebSocket's.")
@click.option("--api-key", envvar="SLUICE_API_KEY", help="Sent as 'Authorization: Bearer' "
              "on the WebSocket handshake.")
@click.option("--direct-api-key", envvar="OPENAI_API_KEY", default="sk-bench",
              show_default=False, help="API key for the direct target [env OPENAI_API_KEY].")
@click.option("--model", default="mock-1", show_default=True)
@click.option("--direct-model", default=None, help="Model name for the direct target "
              "[default: --model].")
@click.option("--sockets", multiple=True, type=click.IntRange(min=1),
              help="A step of N sockets each sending one request, released together "
                   "(repeatable: one step each).  Without any load option: --sockets 1 "
                   "--sockets 10.")
@click.option("--concurrency", multiple=True, type=click.IntRange(min=1),
              help="A step of N streams each sending requests back to back (repeatable).")
@click.option("--rate", multiple=True, type=click.FloatRange(min=0, min_open=True),
              help="A step of constant arrivals per second (repeatable).")
@click.option("--poisson", multiple=True, type=click.FloatRange(min=0, min_open=True),
              help="A step of gamma-distributed arrivals at R per second (repeatable).")
@click.option("--burstiness", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Gamma shape for --poisson: 1 is Poisson, < 1 burstier, > 1 smoother.")
@click.option("--sweep", metavar="KIND:V1,V2,...",
              help="Steps that stop at saturation, e.g. concurrency:1,10,100,1000 or rate:1,2,4.")
@click.option("--requests", type=click.IntRange(min=1),
              help="Requests per step [default: one per socket; 5 per stream; 10 s of a rate].")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Seconds per step after which no request is sent [default: 600].")
@click.option("--connections", default=64, show_default=True, type=click.IntRange(min=1),
              help="Sockets that carry --rate/--poisson requests (jobs share them).")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds one request may take.")
@click.option("--input-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Synthetic prompt length (tiktoken cl100k tokens).")
@click.option("--output-tokens", default=50, show_default=True, type=click.IntRange(min=1),
              help="max_tokens of each request.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="JSONL with 'prompt' or 'messages' and optional 'max_tokens' per line.")
@click.option("--seed", default=0, show_default=True)
@click.option("--slo", multiple=True, metavar="ttft:MS tpot:MS",
              help="Objectives for goodput (and for stopping a sweep).")
@click.option("--max-error-rate", default=0.01, show_default=True,
              help="A sweep stops above this error rate.")
@click.option("--min-gain", default=0.1, show_default=True,
              help="A sweep stops when throughput grew less than this fraction.")
@click.option("--warmup", default=4, show_default=True, type=click.IntRange(min=0),
              help="Short requests per target before measuring.")
@click.option("--verify-text", type=click.Choice(["auto", "count", "off"]), default="auto",
              show_default=True, help="auto: compare with the mock's exact text when the "
              "bench started it; count: tiktoken count must equal usage.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write results.json, summary.csv and report.html here.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_stack_options
def bench(**kw: Any) -> None:
    """Load-test Sluice over WebSockets, or any OpenAI-compatible endpoint directly.

    Reports TTFT, TPOT, ITL, end-to-end and queue-wait percentiles, throughput,
    errors, lost or duplicated tokens, goodput, Sluice's added latency
    (--compare-direct) and, with --start-stack, Sluice's CPU time per token.

    \b
    Examples:
      sluice bench --start-stack --compare-direct --sockets 1 --sockets 100
      sluice bench --start-stack --compare-direct --http --sockets 1 --sockets 200
      sluice bench --url ws://127.0.0.1:8000/ws --sweep concurrency:1,10,100
      sluice bench --direct http://127.0.0.1:8001/v1 --poisson 5 --burstiness 0.5
    """
    try:
        cfg = build_config(kw)
    except BenchError as e:
        raise click.UsageError(str(e)) from None
    _raise_fd_limit()
    stack = None
    runner: Runner | None = None
    status = 0
    try:
        if cfg.start_stack is not None:
            stack = Stack(cfg.start_stack, cfg.model,
                          cfg.out_dir / "logs" if cfg.out_dir else None,
                          max(4096, cfg.output_tokens))
            _say("starting a private Sluice (Redis, mock model, "
                 f"{cfg.start_stack.workers} worker(s), {cfg.start_stack.webs} front end(s))")
            stack.start()
        runner = Runner(cfg, stack)
        _say(f"{len(cfg.steps)} step(s): " + ", ".join(s.label for s in cfg.steps))
        result = asyncio.run(runner.run())
    except BenchError as e:
        _fail(str(e))
    except (KeyboardInterrupt, asyncio.CancelledError):
        status = 130
        if runner is None:
            _say("interrupted")
            sys.exit(status)
        result = runner.result
        result.interrupted = True
    finally:
        if stack is not None:
            _say("stopping the private Sluice")
            stack.stop()
    if stack is not None:
        result.stack = {**stack.describe(), "idle_cpu_ms_per_s": {
            k: v * 1000 for k, v in runner.idle.items()} if runner else {}}
    _finish(result, cfg)
    sys.exit(status or (130 if result.interrupted else 0))


def _finish(result: BenchResult, cfg: BenchConfig) -> None:
    print_summary(result)
    if cfg.out_dir is not None:
        paths = write_files(result, cfg.out_dir)
        _say("wrote " + ", ".join(str(p) for p in paths))


def build_config(kw: dict[str, Any]) -> BenchConfig:
    """Check the options' combinations and build the run's configuration.

    :raises BenchError: a contradictory or incomplete set of options.
    """
    targets = sum(bool(x) for x in (kw["urls"], kw["direct_url"], kw["start_stack"]))
    if targets != 1:
        raise BenchError("give exactly one target: --url WS_URL, --direct BASE_URL or "
                         "--start-stack")
    compare = kw["compare_direct"]
    direct_url = kw["direct_url"]
    if compare is not None:
        if direct_url:
            raise BenchError("--compare-direct compares Sluice with a model; --direct already "
                             "targets the model")
        if compare == AUTO and kw["urls"]:
            raise BenchError("with --url, give the model's URL: --compare-direct BASE_URL")
        if compare != AUTO:
            direct_url = compare
    if kw["http"] and kw["direct_url"]:
        raise BenchError("--http runs Sluice's HTTP API beside its WebSocket: give --url or "
                         "--start-stack")
    for url in kw["urls"]:
        if not url.startswith(("ws://", "wss://")):
            raise BenchError(f"--url {url!r}: expected ws://HOST:PORT/ws or wss://…")
    for url in filter(None, (direct_url,)):
        if not url.startswith(("http://", "https://")):
            raise BenchError(f"{url!r}: expected an http:// or https:// base URL")
    given = {k: list(kw[k]) for k in KINDS if kw[k]}
    if kw["sweep"]:
        if given:
            raise BenchError("--sweep sets the steps; do not combine it with --" +
                             "/--".join(given))
        kind, values = parse_sweep(kw["sweep"])
        given = {kind: values}
    if len(given) > 1:
        raise BenchError("use one load kind per run: --" + " or --".join(given))
    kind, values = next(iter(given.items())) if given else ("sockets", [1.0, 10.0])
    requests = kw["requests"]
    if requests is None and kw["duration"] is not None and kind != "sockets":
        requests = 10**7  # a time-bound step: the duration ends it
    steps = build_steps(kind, [float(v) for v in values], requests, kw["duration"] or 600.0,
                        kw["burstiness"])
    stack = None
    if kw["start_stack"]:
        env = []
        for pair in kw["stack_env"]:
            var, eq, value = pair.partition("=")
            if not eq or not var:
                raise BenchError(f"--stack-env {pair!r}: expected VAR=VALUE")
            env.append((var, value))
        stack = StackOptions(kw["workers"], kw["worker_concurrency"], kw["webs"],
                             kw["mock_ttft_ms"], kw["mock_itl_ms"], kw["mock_jitter_ms"],
                             kw["mock_output_tokens"], tuple(env))
    return BenchConfig(
        steps=steps, urls=tuple(kw["urls"]), direct_url=direct_url, start_stack=stack,
        compare_direct=compare is not None, http=kw["http"], api_key=kw["api_key"],
        direct_api_key=kw["direct_api_key"] or "sk-bench", model=kw["model"],
        direct_model=kw["direct_model"], input_tokens=kw["input_tokens"],
        output_tokens=kw["output_tokens"], prompts_file=kw["prompts_file"], seed=kw["seed"],
        slo=parse_slo(kw["slo"]), sweep=bool(kw["sweep"]),
        max_error_rate=kw["max_error_rate"], min_gain=kw["min_gain"],
        connections=kw["connections"], timeout_s=kw["timeout_s"], warmup=kw["warmup"],
        verify_text=kw["verify_text"], out_dir=kw["out_dir"], progress=kw["progress"])


def _raise_fd_limit() -> None:
    # A thousand sockets need more descriptors than the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                    else 65536, hard))


def _say(text: str) -> None:
    click.echo(f"sluice bench: {text}", err=True)


def _fail(text: str) -> None:
    click.echo(f"sluice bench: error: {text}", err=True)
    sys.exit(2)
