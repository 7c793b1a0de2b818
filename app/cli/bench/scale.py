"""``sluice bench-scale``: the bench over a matrix of deployments, one fresh stack per cell.

Two parts, each a list of cells (workers x front ends x sockets):

* **idle**: one request at a time (``--idle-requests``, spread round robin
  over the front ends, each followed by the same request straight at the
  model) on a stack whose every worker process and front end has already
  served jobs, so the figure is a warm system's added TTFT, not a process's
  first job.
* **scale**: N sockets released together, twice: 1-token jobs (CPU per job
  by role) and ``--output-tokens`` jobs (CPU per token by role, added TTFT,
  TPOT ratio, errors, lost and duplicated events), the latter also straight
  at the model (``--compare-direct``).

Each cell prints one row on stdout as it ends; at the end come two
reStructuredText tables ready for the README, and with ``--out DIR``
``scale.json`` and ``scale.csv``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import sys
import textwrap
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, TextIO, TypeVar

import click

from app.cli.bench.cli import _raise_fd_limit
from app.cli.bench.config import BenchConfig, BenchError, Slo, StackOptions, Step
from app.cli.bench.direct_client import POOLS, DirectClient
from app.cli.bench.output import clean, environment
from app.cli.bench.prompts import Prompt, PromptSource
from app.cli.bench.record import RequestRecord, Stream
from app.cli.bench.runner import BenchResult, Runner, StepResult
from app.cli.bench.sluice_client import SluiceConn, open_conns, probe
from app.cli.bench.stack import Stack
from app.cli.bench.stats import added_latency, aggregate
from app.cli.dev.mockllm import expected_text

ROLES = ("web", "worker", "redis")
FC = TypeVar("FC", bound=Callable[..., Any])


@dataclass(frozen=True)
class Cell:
    """One deployment and load of the matrix."""

    part: str  # "idle" or "scale"
    workers: int
    webs: int
    sockets: int

    @property
    def label(self) -> str:
        """E.g. ``scale w=2 web=1 s=1000``."""
        return f"{self.part} w={self.workers} web={self.webs} s={self.sockets}"


@dataclass(frozen=True)
class Plan:
    """Everything one ``sluice bench-scale`` run does."""

    cells: tuple[Cell, ...]
    idle_requests: int = 20
    idle_output_tokens: int = 5
    output_tokens: int = 50
    #: Greenlets per worker process; ``None``: :meth:`concurrency` sizes it per cell.
    worker_concurrency: int | None = None
    mock_ttft_ms: float = 200.0
    mock_itl_ms: float = 100.0
    compare_direct: bool = True
    warm_jobs: int = 2
    timeout_s: float = 120.0
    env: tuple[tuple[str, str], ...] = ()
    model: str = "mock-1"
    progress: bool = True
    #: No cell starts after this many seconds (``None``: no bound).
    max_s: float | None = None

    def concurrency(self, cell: Cell) -> int:
        """Greenlets per worker: as given, else 500 or enough for every socket's job at once.

        With fewer slots than sockets the rest of the jobs wait in the queue for a
        whole stream to end, which measures the sizing, not Sluice.
        """
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        return max(500, math.ceil(1.1 * cell.sockets / cell.workers))

    def stack_options(self, cell: Cell) -> StackOptions:
        """The private stack of one cell."""
        return StackOptions(cell.workers, self.concurrency(cell), cell.webs,
                            self.mock_ttft_ms, self.mock_itl_ms, 0.0,
                            max(self.output_tokens, self.idle_output_tokens), self.env)

    def estimate_s(self, cell: Cell) -> float:
        """A rough duration of one cell in seconds (fitted on a shared 2-core machine)."""
        ttft, itl = self.mock_ttft_ms / 1000, self.mock_itl_ms / 1000
        start = 5.0 + 1.5 * (cell.workers + cell.webs)
        if cell.part == "idle":
            one = (ttft + (self.idle_output_tokens - 1) * itl + 0.05) * (
                2 if self.compare_direct else 1)
            # Jobs land on workers at random-ish: warming takes about twice the minimum,
            # and the measurement goes on until every worker has run one.
            warm = 2 * self.warm_jobs * cell.workers * (ttft + 0.15)
            return start + warm + max(self.idle_requests, 2.5 * cell.workers) * one
        stream = ttft + (self.output_tokens - 1) * itl
        s = cell.sockets
        connect = 2 * (0.5 + s * 0.003)
        jobs = ttft + s * 0.01  # 1-token jobs: the job starts are the work
        tokens = stream + s * 0.008 + (stream + s * 0.0015 if self.compare_direct else 0)
        return start + 2 * (1.0 + 1.0) + connect + jobs + tokens


@dataclass
class CellResult:
    """What one cell measured; :meth:`summary` is its row."""

    cell: Cell
    concurrency: int = 0
    duration_s: float = 0.0
    error: str | None = None
    interrupted: bool = False
    steps: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# the command


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: expected positive integers, e.g. 1,2,4")
    return values


def _list(name: str, default: str, help_: str) -> Callable[[FC], FC]:
    return click.option(name, default=default, show_default=True, metavar="N,N,...",
                        callback=lambda _c, _p, v: _ints(v) if v else (), help=help_)


QUICK = {"idle_workers": (1, 8), "idle_webs": (1, 2), "idle_requests": 10,
         "scale_workers": (1, 4), "scale_webs": (1, 2), "scale_sockets": (100,)}


@click.command("bench-scale")
@_list("--idle-workers", "1,2,4,8", "Worker processes of the idle cells (empty: no idle part).")
@_list("--idle-webs", "1,2", "Front-end processes of the idle cells.")
@click.option("--idle-requests", default=20, show_default=True, type=click.IntRange(min=1),
              help="Requests one after the other in each idle cell (p50 over them).")
@click.option("--idle-output-tokens", default=5, show_default=True, type=click.IntRange(min=2),
              help="max_tokens of the idle requests (TTFT does not depend on it).")
@_list("--scale-workers", "1,2,4", "Worker processes of the scale cells (empty: no scale part).")
@_list("--scale-webs", "1,2", "Front-end processes of the scale cells.")
@_list("--scale-sockets", "100,1000", "Sockets released together in the scale cells.")
@click.option("--output-tokens", default=50, show_default=True, type=click.IntRange(min=2),
              help="max_tokens of the scale cells' token step (CPU per token, TPOT).")
@click.option("--quick", is_flag=True,
              help="A smaller matrix: idle 1 and 8 workers x 1 and 2 front ends, 10 requests; "
                   "scale 1 and 4 workers x 1 and 2 front ends at 100 sockets.")
@click.option("--compare-direct/--no-compare-direct", default=True, show_default=True,
              help="Also send each measured load straight to the mock (added latency).")
@click.option("--worker-concurrency", type=click.IntRange(min=1),
              help="Greenlets per worker process (-c) [default: 500, or 1.1 x sockets / "
                   "workers when that is more, so every job of a cell can run at once].")
@click.option("--warm-jobs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Idle cells: jobs each worker process must have run before measuring.")
@click.option("--mock-ttft-ms", default=200.0, show_default=True)
@click.option("--mock-itl-ms", default=100.0, show_default=True)
@click.option("--stack-env", multiple=True, metavar="VAR=VALUE",
              help="Extra environment for every stack's processes (repeatable).")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Seconds one request may take.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write scale.json and scale.csv here.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Start no cell after this many minutes; the tables cover those that ran.")
@click.option("--dry-run", is_flag=True, help="Print the cells and the estimate, run nothing.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def bench_scale(**kw: Any) -> None:
    """Run ``sluice bench`` over a matrix of private stacks (workers x front ends x sockets).

    Every cell starts a fresh stack (Redis, the mock model, N Celery workers,
    M gunicorn front ends), measures, and stops it. Idle cells: added TTFT of
    one request at a time on a warm stack (every worker has run jobs).
    Scale cells: CPU per job (1-token jobs) and per token, by role, added
    TTFT, TPOT ratio and integrity with N sockets at once.

    \b
    Examples:
      sluice bench-scale --out scale-results          # the issue's matrix (~15 min)
      sluice bench-scale --quick
      sluice bench-scale --idle-workers '' --scale-workers 2 --scale-sockets 100
    """
    if kw["quick"]:
        for key, value in QUICK.items():
            if click.get_current_context().get_parameter_source(key) \
                    == click.core.ParameterSource.DEFAULT:
                kw[key] = value
    env = []
    for pair in kw["stack_env"]:
        var, eq, value = pair.partition("=")
        if not eq or not var:
            raise click.UsageError(f"--stack-env {pair!r}: expected VAR=VALUE")
        env.append((var, value))
    cells = [Cell("idle", w, m, 1) for w in kw["idle_workers"] for m in kw["idle_webs"]]
    cells += [Cell("scale", w, m, s) for w in kw["scale_workers"] for m in kw["scale_webs"]
              for s in kw["scale_sockets"]]
    if not cells:
        raise click.UsageError("the matrix is empty: give --idle-workers or --scale-workers")
    plan = Plan(tuple(cells), kw["idle_requests"], kw["idle_output_tokens"],
                kw["output_tokens"], kw["worker_concurrency"], kw["mock_ttft_ms"],
                kw["mock_itl_ms"], kw["compare_direct"], kw["warm_jobs"], kw["timeout_s"],
                tuple(env), progress=kw["progress"],
                max_s=kw["max_minutes"] * 60 if kw["max_minutes"] else None)
    total = sum(plan.estimate_s(c) for c in cells)
    _say(f"{len(cells)} cell(s), a fresh stack each; estimated {_duration(total)}")
    if kw["dry_run"]:
        for c in cells:
            click.echo(f"{c.label:<24} -c {plan.concurrency(c):<5} "
                       f"~{_duration(plan.estimate_s(c))}")
        return
    _raise_fd_limit()
    results = run_matrix(plan, sys.stdout)
    interrupted = any(r.interrupted for r in results)
    print_rst(results, plan, sys.stdout)
    if kw["out_dir"] is not None:
        paths = write_scale_files(results, plan, kw["out_dir"])
        _say("wrote " + ", ".join(str(p) for p in paths))
    failed = sum(1 for r in results if r.error)
    sys.exit(130 if interrupted else 1 if failed == len(results) else 0)


def run_matrix(plan: Plan, out: TextIO) -> list[CellResult]:
    """Run every cell in order, printing its row as it ends; stop after a Ctrl-C."""
    results: list[CellResult] = []
    t_all = perf_counter()
    header_printed = False
    for n, cell in enumerate(plan.cells, 1):
        if plan.max_s is not None and perf_counter() - t_all > plan.max_s:
            _say(f"--max-minutes reached: skipping the last {len(plan.cells) - n + 1} cell(s)")
            break
        _say(f"cell {n}/{len(plan.cells)}: {cell.label} (~{_duration(plan.estimate_s(cell))}; "
             f"{_duration(perf_counter() - t_all)} so far)")
        res = run_cell(plan, cell)
        results.append(res)
        if not header_printed:
            out.write(_text_row(HEADERS) + "\n")
            header_printed = True
        out.write(_text_row(row(res)) + "\n")
        out.flush()
        if res.error:
            _say(f"{cell.label}: {res.error}")
        if res.interrupted:
            _say("interrupted: the tables cover the cells measured so far")
            break
    _say(f"matrix done in {_duration(perf_counter() - t_all)}")
    return results


def run_cell(plan: Plan, cell: Cell) -> CellResult:
    """Start a fresh stack, measure the cell, stop the stack; errors end up in the result."""
    res = CellResult(cell, plan.concurrency(cell))
    t0 = perf_counter()
    stack = Stack(plan.stack_options(cell), plan.model,
                  max_tokens_limit=max(4096, plan.output_tokens))
    try:
        stack.start()
        if cell.part == "idle":
            asyncio.run(_idle_cell(plan, cell, stack, res))
        else:
            _scale_cell(plan, cell, stack, res)
    except BenchError as e:
        res.error = str(e).splitlines()[0]
    except KeyboardInterrupt:
        res.interrupted = True
    finally:
        stack.stop()
    res.duration_s = perf_counter() - t0
    res.summary = summarize(res)
    return res


# ---------------------------------------------------------------------------
# idle cells


async def _idle_cell(plan: Plan, cell: Cell, stack: Stack, res: CellResult) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for url in stack.urls:
        await probe(url, headers)
    direct = DirectClient(stack.mock_url, "sk-bench", plan.model, None) \
        if plan.compare_direct else None
    conns = await open_conns(tuple(stack.urls), len(stack.urls), plan.model, headers, None)
    try:
        if direct is not None:
            await direct.probe()
        # Warm every process: each front end and each worker process runs
        # --warm-jobs jobs before the measurement (a process's first job pays
        # for its first connections and lazy imports).  A round sends one job
        # per process of the larger role, over the front ends in turn.
        warm_prompt = Prompt([{"role": "user", "content": "warm up"}], 1)
        sink: array[float] = array("d")
        rounds = sent = 0
        counts = await asyncio.to_thread(jobs_per_worker, stack)
        while rounds < plan.warm_jobs or (
                rounds < 4 * plan.warm_jobs and not _all_warm(counts, stack, plan.warm_jobs)):
            for _ in range(max(cell.workers, len(conns))):
                k = sent % len(conns)
                s = Stream(RequestRecord("sluice", -1, sent, k), warm_prompt, sink, None,
                           False)
                await conns[k].request(s, perf_counter(), plan.timeout_s)
                sent += 1
            rounds += 1
            counts = await asyncio.to_thread(jobs_per_worker, stack)
        if direct is not None:
            s = Stream(RequestRecord("direct", -1, 0, 0), warm_prompt, sink, None, False)
            await direct.request(s, perf_counter(), plan.timeout_s)
        before = counts
        # The measurement: one request at a time, alternating front ends, each
        # followed by the same prompt straight at the model.
        prompts = PromptSource(input_tokens=32, output_tokens=plan.idle_output_tokens, seed=0)
        records: dict[str, list[RequestRecord]] = {"sluice": [], "direct": []}
        itl: dict[str, array[float]] = {"sluice": array("d"), "direct": array("d")}
        t_step = perf_counter()
        i = 0
        while True:
            if i >= plan.idle_requests:
                # Celery's Redis transport hands a message to whichever idle worker's
                # BRPOP is oldest, and those time out and re-block every second, so
                # the spread is not a strict rotation: go on (up to 3x the requests)
                # until every worker process has run at least one measured job.
                after = await asyncio.to_thread(jobs_per_worker, stack)
                if after is None or i >= 3 * plan.idle_requests or _all_warm(
                        _minus(after, before), stack, 1):
                    break
            prompt = prompts.next()
            expected = expected_text(prompt.messages, prompt.max_tokens, stack.mock_config)
            conn = conns[i % len(conns)]
            lanes: list[tuple[str, SluiceConn | DirectClient]] = [("sluice", conn)]
            if direct is not None:
                lanes.append(("direct", direct))
            for target, lane in lanes:
                rec = RequestRecord(target, 0, i, i % len(conns) if target == "sluice" else 0)
                await lane.request(Stream(rec, prompt, itl[target], expected, True), t_step,
                                   plan.timeout_s)
                records[target].append(rec)
            i += 1
            if plan.progress and i % 5 == 0:
                _say(f"  {i} idle requests")
        wall = perf_counter() - t_step
    finally:
        await asyncio.gather(*(c.close() for c in conns))
        if direct is not None:
            await direct.close()
    for target, recs in records.items():
        if recs:
            res.steps[target] = {"aggregate": aggregate(recs, itl[target], Slo(), wall)}
    if "direct" in res.steps:
        res.steps["added"] = added_latency(res.steps["sluice"]["aggregate"],
                                           res.steps["direct"]["aggregate"])
    res.steps["jobs_per_worker_warm"] = before
    res.steps["warm_jobs_sent"] = sent
    measured = _minus(after, before) if after is not None else None
    res.steps["jobs_per_worker_measured"] = measured
    if measured is not None and not _all_warm(measured, stack, 1):
        _say(f"{cell.label}: some worker process ran none of the measured jobs: {measured}")


def _minus(after: dict[str, int], before: dict[str, int] | None) -> dict[str, int]:
    return {k: v - (before or {}).get(k, 0) for k, v in after.items()}


def _all_warm(counts: dict[str, int] | None, stack: Stack, jobs: int) -> bool:
    if counts is None:  # the workers do not report: fall back to a fixed number of rounds
        return False
    return all(counts.get(name, 0) >= jobs for name in stack.worker_names)


def jobs_per_worker(stack: Stack) -> dict[str, int] | None:
    """Tasks each worker process has received since it started (Celery's ``inspect stats``).

    ``None`` when no worker answered.
    """
    from celery import Celery

    app = Celery("sluice-bench", broker=stack.redis_url)
    try:
        replies = app.control.inspect(destination=stack.worker_names, timeout=1.0).stats()
    finally:
        app.close()
    if not replies:
        return None
    return {name: sum((r.get("total") or {}).values()) for name, r in replies.items()}


# ---------------------------------------------------------------------------
# scale cells


def _scale_cell(plan: Plan, cell: Cell, stack: Stack, res: CellResult) -> None:
    step = Step("sockets", float(cell.sockets), cell.sockets, 600.0)
    runs = (("jobs", 1, False), ("tokens", plan.output_tokens, plan.compare_direct))
    for name, tokens, compare in runs:
        cfg = BenchConfig(steps=(step,), start_stack=stack.opts, compare_direct=compare,
                          model=plan.model, output_tokens=tokens, timeout_s=plan.timeout_s,
                          warmup=max(POOLS, 2 * cell.workers), progress=plan.progress)
        runner = Runner(cfg, stack)
        try:
            result = asyncio.run(runner.run())
        except (KeyboardInterrupt, asyncio.CancelledError):
            res.interrupted = True
            return
        res.steps[name] = _step_json(result, runner)
        if result.interrupted:
            res.interrupted = True
            return


def _step_json(result: BenchResult, runner: Runner) -> dict[str, Any]:
    def one(s: StepResult | None) -> dict[str, Any] | None:
        if s is None:
            return None
        return {"aggregate": s.agg, "cpu": s.cpu, "client": s.client}

    by_target = {s.target: s for s in result.steps}
    return {"sluice": one(by_target.get("sluice")), "direct": one(by_target.get("direct")),
            "added": result.added.get(0), "idle_cpu_s_per_s": runner.idle}


# ---------------------------------------------------------------------------
# figures


def summarize(res: CellResult) -> dict[str, Any]:
    """The cell's row as a flat dict (the JSON and CSV fields)."""
    c = res.cell
    out: dict[str, Any] = {"part": c.part, "workers": c.workers, "webs": c.webs,
                           "sockets": c.sockets, "worker_concurrency": res.concurrency,
                           "duration_s": round(res.duration_s, 1),
                           "error": res.error, "interrupted": res.interrupted}
    main = res.steps.get("sluice") if c.part == "idle" else \
        (res.steps.get("tokens") or {}).get("sluice")
    added = res.steps.get("added") if c.part == "idle" else \
        (res.steps.get("tokens") or {}).get("added")
    agg: dict[str, Any] = (main or {}).get("aggregate") or {}
    out["requests"] = agg.get("requests")
    out["ok"] = agg.get("ok")
    out["errors"] = sum((agg.get("errors") or {}).values()) if agg else None
    out["error_kinds"] = agg.get("errors")
    out["lost"] = agg.get("lost")
    out["dup"] = agg.get("dup")
    out["mismatch"] = agg.get("mismatch")
    out["ttft_p50_ms"] = (agg.get("ttft_ms") or {}).get("p50")
    out["ttft_p99_ms"] = (agg.get("ttft_ms") or {}).get("p99")
    out["queue_p50_ms"] = (agg.get("queue_ms") or {}).get("p50")
    out["added_ttft_p50_ms"] = (added or {}).get("ttft_ms", {}).get("p50")
    out["added_ttft_p99_ms"] = (added or {}).get("ttft_ms", {}).get("p99")
    out["tpot_ratio"] = (added or {}).get("tpot_ratio_p50")
    if c.part == "idle":
        out["jobs_per_worker"] = res.steps.get("jobs_per_worker_measured")
        return out
    jobs = (res.steps.get("jobs") or {}).get("sluice") or {}
    jobs_cpu, jobs_ok = jobs.get("cpu") or {}, (jobs.get("aggregate") or {}).get("ok") or 0
    jobs_agg = jobs.get("aggregate") or {}
    out["job_errors"] = sum((jobs_agg.get("errors") or {}).values()) if jobs_agg else None
    idle_jobs = (res.steps.get("jobs") or {}).get("idle_cpu_s_per_s") or {}
    by_job = _per(jobs_cpu, jobs_ok, 1e3, idle_jobs)
    out["cpu_ms_per_job"] = by_job[0]
    out["cpu_ms_per_job_net"] = by_job[1]
    tok_cpu = (main or {}).get("cpu") or {}
    idle_tok = (res.steps.get("tokens") or {}).get("idle_cpu_s_per_s") or {}
    by_tok = _per(tok_cpu, tok_cpu.get("tokens") or 0, 1e6, idle_tok)
    out["cpu_us_per_token"] = by_tok[0]
    out["cpu_us_per_token_net"] = by_tok[1]
    lag = ((main or {}).get("client") or {}).get("lag_ms") or {}
    out["client_lag_p99_ms"] = lag.get("p99")
    return out


def _per(cpu: dict[str, Any], n: int, scale: float,
         idle: dict[str, float]) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """CPU by role (and in total) per unit, gross and net of the roles' idle CPU."""
    seconds = cpu.get("seconds")
    if not seconds or not n:
        return None, None
    window = cpu.get("window_s") or 0.0
    gross = {r: seconds.get(r, 0.0) * scale / n for r in ROLES}
    gross["total"] = sum(gross.values())
    net = {r: max(0.0, seconds.get(r, 0.0) - idle.get(r, 0.0) * window) * scale / n
           for r in ROLES}
    net["total"] = sum(net.values())
    return gross, net


HEADERS = ["part", "workers", "webs", "sockets", "ok/req", "+TTFT p50 ms", "+TTFT p99 ms",
           "TPOT ratio", "err/lost/dup", "CPU/job ms web/wkr/redis=total",
           "CPU/tok us web/wkr/redis=total"]
WIDTHS = [5, 7, 4, 7, 9, 12, 12, 10, 12, 31, 31]


def row(res: CellResult) -> list[str]:
    """The cell's cells of the running text table."""
    s = res.summary
    ok = f"{s['ok']}/{s['requests']}" if s.get("requests") is not None else "-"
    errors = "-" if s.get("errors") is None else \
        f"{s['errors'] + (s.get('job_errors') or 0)}/{s['lost']}/{s['dup']}"
    if res.error:
        ok = "failed"
    return [s["part"], str(s["workers"]), str(s["webs"]), f"{s['sockets']:,}", ok,
            _num(s.get("added_ttft_p50_ms")), _num(s.get("added_ttft_p99_ms")),
            _num(s.get("tpot_ratio"), 2), errors,
            _roles(s.get("cpu_ms_per_job"), 2), _roles(s.get("cpu_us_per_token"), 0)]


def _text_row(cells: list[str]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))).rstrip()


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _roles(by: dict[str, float] | None, digits: int) -> str:
    if not by:
        return "-"
    return " / ".join(_num(by[r], digits) for r in ROLES) + f" = {_num(by['total'], digits)}"


def rst_table(headers: list[list[str]], rows: list[list[str]]) -> str:
    """A reStructuredText simple table; ``headers`` are the header's lines (columns each)."""
    n = len(headers[0])
    widths = [max(len(r[i]) for r in [*headers, *rows]) for i in range(n)]
    border = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([border, *(line(h) for h in headers), border,
                      *(line(r) for r in rows), border])


def rst_tables(results: list[CellResult], plan: Plan) -> str:
    """The idle and scale tables as reStructuredText, each with a line saying what it is."""
    parts = []
    idle = [r for r in results if r.cell.part == "idle"]
    scale = [r for r in results if r.cell.part == "scale"]
    if idle:
        rows = []
        for r in idle:
            s = r.summary
            rows.append([str(s["workers"]), str(s["webs"]),
                         "failed" if r.error else f"{s['ok']}/{s['requests']}",
                         _num(s.get("added_ttft_p50_ms")), _num(s.get("added_ttft_p99_ms")),
                         _num(s.get("ttft_p50_ms")), _num(s.get("tpot_ratio"), 2),
                         _jobs(s.get("jobs_per_worker"))])
        intro = (f"Idle: one request at a time (at least {plan.idle_requests} per cell, "
                 f"{plan.idle_output_tokens} tokens, mock TTFT {plan.mock_ttft_ms:g} ms), every "
                 "worker process warm; added = Sluice minus the same request straight at "
                 "the model.")
        parts.append(
            textwrap.fill(intro, width=79) + "\n\n" + rst_table(
                [["workers", "webs", "ok", "added TTFT", "added TTFT", "TTFT p50",
                  "TPOT", "jobs per worker"],
                 ["", "", "", "p50 (ms)", "p99 (ms)", "(ms)", "ratio", ""]], rows))
    if scale:
        rows = []
        for r in scale:
            s = r.summary
            errors = "-" if s.get("errors") is None else \
                f"{s['errors'] + (s.get('job_errors') or 0)} / {s['lost']} / {s['dup']}"
            rows.append([str(s["workers"]), str(s["webs"]), str(s["worker_concurrency"]),
                         f"{s['sockets']:,}", _num(s.get("added_ttft_p50_ms")),
                         _num(s.get("added_ttft_p99_ms")),
                         _num(s.get("tpot_ratio"), 2), "failed" if r.error else errors,
                         _roles(s.get("cpu_ms_per_job"), 2),
                         _roles(s.get("cpu_us_per_token"), 0)])
        intro = ("Scale: N sockets released together; CPU per job from 1-token jobs, CPU per "
                 f"token and latency from {plan.output_tokens}-token jobs (mock TTFT "
                 f"{plan.mock_ttft_ms:g} ms, {plan.mock_itl_ms:g} ms per token); -c: "
                 "greenlets per worker process; CPU summed over each role's processes, "
                 "from /proc.")
        parts.append(
            textwrap.fill(intro, width=79) + "\n\n" + rst_table(
                [["workers", "webs", "-c", "sockets", "added TTFT", "added TTFT", "TPOT",
                  "errors / lost", "CPU per job (ms)", "CPU per token (us)"],
                 ["", "", "", "", "p50 (ms)", "p99 (ms)", "ratio", "/ dup",
                  "web / worker / redis", "web / worker / redis"]], rows))
    return "\n\n".join(parts)


def _jobs(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    return " ".join(str(v) for _, v in sorted(counts.items(), key=lambda kv: _worker_no(kv[0])))


def _worker_no(name: str) -> int:
    digits = "".join(ch for ch in name.split("-", 1)[0] if ch.isdigit())
    return int(digits) if digits else 0


def print_rst(results: list[CellResult], plan: Plan, out: TextIO) -> None:
    """The final tables, for the README."""
    text = rst_tables(results, plan)
    if text:
        out.write("\nreStructuredText for the README:\n\n" + text + "\n")
        out.flush()


def write_scale_files(results: list[CellResult], plan: Plan, out_dir: Path) -> list[Path]:
    """Write ``scale.json`` (plan, environment, every cell's row and steps) and ``scale.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "scale.json", out_dir / "scale.csv"]
    data = {"format": "sluice-bench-scale/1", "plan": _plan_json(plan),
            "environment": environment(),
            "cells": [{**r.summary, "steps": r.steps} for r in results],
            "rst": rst_tables(results, plan)}
    paths[0].write_text(json.dumps(clean(data), indent=1, allow_nan=False) + "\n")
    rows = [flat(r.summary) for r in results]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return paths


def flat(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary with its by-role dicts spread into columns (``cpu_ms_per_job_web`` …)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if k == "jobs_per_worker":
            out[k] = _jobs(v)
        elif isinstance(v, dict) and k != "error_kinds":
            for sub, x in v.items():
                out[f"{k}_{sub}"] = round(x, 3) if isinstance(x, float) else x
        elif k == "error_kinds":
            out[k] = ",".join(f"{e}:{n}" for e, n in (v or {}).items())
        else:
            out[k] = round(v, 3) if isinstance(v, float) else v
    return out


def _plan_json(plan: Plan) -> dict[str, Any]:
    d = {k: getattr(plan, k) for k in plan.__dataclass_fields__ if k != "cells"}
    d["cells"] = [c.label for c in plan.cells]
    d["estimate_s"] = round(sum(plan.estimate_s(c) for c in plan.cells))
    return d


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    click.echo(f"sluice bench-scale {stamp}: {text}", err=True)
