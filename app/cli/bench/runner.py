"""Runs a bench: probes, warm-up, each step on each target, CPU accounting, sweeps, Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app.cli.bench import cpu
from app.cli.bench.config import BenchConfig, BenchError, Step
from app.cli.bench.direct_client import DirectClient
from app.cli.bench.load import Counters, Lane, run_load, show_progress
from app.cli.bench.prompts import Prompt, PromptSource, load_jsonl
from app.cli.bench.record import RequestRecord, Stream
from app.cli.bench.sluice_client import open_conns, probe
from app.cli.bench.stack import Stack
from app.cli.bench.stats import added_latency, aggregate, dist, saturation
from app.cli.dev.mockllm import expected_text, get_encoding


@dataclass
class StepResult:
    """One step run against one target."""

    index: int
    step: Step
    target: str
    records: list[RequestRecord]
    agg: dict[str, Any]
    cpu: dict[str, Any] | None = None
    client: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


@dataclass
class BenchResult:
    """Everything a run measured."""

    config: BenchConfig
    steps: list[StepResult] = field(default_factory=list)
    added: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: The same for the ``http`` target (Sluice's OpenAI-compatible API) per step.
    added_http: dict[int, dict[str, Any]] = field(default_factory=dict)
    stop_reason: str | None = None
    interrupted: bool = False
    stack: dict[str, Any] | None = None


class Runner:
    """Drives one ``sluice bench`` invocation inside an event loop."""

    def __init__(self, cfg: BenchConfig, stack: Stack | None = None) -> None:
        self.cfg = cfg
        self.stack = stack
        self.stop = asyncio.Event()
        self.result = BenchResult(cfg)
        self.counters = Counters()
        self.urls = tuple(stack.urls) if stack else cfg.urls
        self.direct_url = cfg.direct_url or (stack.mock_url if stack and cfg.compare_direct
                                             else None)
        key = cfg.api_key or (stack.api_key if stack else None)
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        #: Sluice's OpenAI-compatible base URLs, on the same front ends as ``urls``.
        self.http_urls = tuple(http_base(u) for u in self.urls) if cfg.http else ()
        self.fixed: list[Prompt] | None = None
        if cfg.prompts_file is not None:
            self.fixed = load_jsonl(cfg.prompts_file, cfg.output_tokens)
        mode = cfg.verify_text
        if mode == "auto":
            mode = "exact" if stack else "off"
        self.verify = mode
        enc = get_encoding()
        self.counted: Callable[[str], int] | None = (
            (lambda text: len(enc.encode_ordinary(text))) if mode == "count" else None)
        self.idle: dict[str, float] = {}
        self._interrupts = 0
        self._measuring = False  # before the first step, Ctrl-C just quits
        self.http: DirectClient | None = None

    async def run(self) -> BenchResult:
        """Run every step; return what was measured, also after Ctrl-C."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt, main)
        direct: DirectClient | None = None
        if self.direct_url:
            direct = DirectClient(self.direct_url, self.cfg.direct_api_key,
                                  self.cfg.direct_model or self.cfg.model, self.counted)
        if self.http_urls:
            self.http = DirectClient(self.http_urls, self.key or "", self.cfg.model,
                                     self.counted)
        progress = asyncio.create_task(show_progress(self.counters)) if self.cfg.progress \
            else None
        try:
            for url in self.urls:
                await probe(url, self.headers)
            if direct is not None:
                await direct.probe()
            if self.http is not None:
                await self.http.probe()
            self.counters.label = "warming up"
            await self._warm_up(direct)
            if self.stack is not None:
                self.counters.label = "measuring the stack's idle CPU"
                await self._measure_idle()
            await self._steps(direct)
        finally:
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
            if direct is not None:
                await direct.close()
            if self.http is not None:
                await self.http.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return self.result

    def _interrupt(self, main: asyncio.Task[Any] | None) -> None:
        self._interrupts += 1
        self.result.interrupted = True
        if self._interrupts == 1 and self._measuring:
            sys.stderr.write("\nsluice bench: interrupted; reporting what was measured "
                             "(press Ctrl-C again to quit at once)\n")
            self.stop.set()
        elif main is not None:
            main.cancel()

    async def _steps(self, direct: DirectClient | None) -> None:
        previous: dict[str, Any] | None = None
        primary = "sluice" if self.urls else "direct"
        self._measuring = True
        for i, step in enumerate(self.cfg.steps):
            res = await self._run_step(i, step, primary, direct)
            over_http = None
            if self.http is not None and not self.stop.is_set():
                over_http = await self._run_step(i, step, "http", self.http)
            if direct is not None and primary == "sluice" and not self.stop.is_set():
                other = await self._run_step(i, step, "direct", direct)
                self.result.added[i] = added_latency(res.agg, other.agg)
                if over_http is not None:
                    self.result.added_http[i] = added_latency(over_http.agg, other.agg)
            if self.stop.is_set():
                return
            if self.cfg.sweep:
                reason = saturation(previous, res.agg, self.cfg.slo, self.cfg.max_error_rate,
                                    self.cfg.min_gain)
                if reason is not None:
                    if i + 1 < len(self.cfg.steps):
                        self.result.stop_reason = f"saturated at {step.label}: {reason}"
                        return
                    self.result.stop_reason = f"last step {step.label}: {reason}"
                previous = res.agg

    async def _run_step(self, index: int, step: Step, target: str,
                        direct: DirectClient | None) -> StepResult:
        c = self.counters
        c.label, c.total, c.sent, c.done, c.errors = f"{step.label} {target}", step.requests, \
            0, 0, 0
        c.streams = []
        prompts = PromptSource(self.fixed, input_tokens=self.cfg.input_tokens,
                               output_tokens=self.cfg.output_tokens, seed=self.cfg.seed + index)
        itl: array[float] = array("d")
        keep = self.verify != "off"

        def new_stream(n: int, lane: int) -> Stream:
            prompt = prompts.next()
            expected = expected_text(prompt.messages, prompt.max_tokens, self.stack.mock_config) \
                if self.verify == "exact" and self.stack is not None else None
            return Stream(RequestRecord(target, index, n, lane), prompt, itl, expected, keep)

        lanes_wanted = step.streams if step.kind in ("sockets", "concurrency") \
            else self.cfg.connections
        roles = self.stack.roles() if self.stack is not None and target in ("sluice", "http") \
            else {}
        if roles and self.stack is not None:
            roles["mock"] = self.stack.mock_pids()  # reported beside, never in the figure
        cpu0 = cpu.snapshot(roles)
        t0 = perf_counter()
        conns = []
        lanes: Sequence[Lane]
        if target == "sluice":
            conns = await open_conns(self.urls, lanes_wanted, self.cfg.model, self.headers,
                                     self.counted)
            lanes = conns
        elif target == "http":
            assert self.http is not None
            lanes = [self.http] * lanes_wanted
        else:
            assert direct is not None
            lanes = [direct] * lanes_wanted
        connect_s = perf_counter() - t0
        connect_failures = sum(1 for conn in conns if conn.failure)
        cpu1, bench0, t1 = cpu.snapshot(roles), cpu.self_cpu_seconds(), perf_counter()
        try:
            load = await run_load(step, lanes, new_stream, self.cfg.timeout_s, self.stop, c,
                                  self.cfg.seed + index)
        finally:
            cpu2, bench1, t2 = cpu.snapshot(roles), cpu.self_cpu_seconds(), perf_counter()
            await asyncio.gather(*(conn.close() for conn in conns))
        agg = aggregate(load.records, itl, self.cfg.slo, load.wall_s)
        res = StepResult(index, step, target, load.records, agg, interrupted=load.interrupted)
        res.client = {"lag_ms": dist(load.lag_ms), "cpu_s": bench1 - bench0,
                      "connect_s": connect_s,
                      "connect_failures": connect_failures}
        if roles:
            res.cpu = self._cpu(cpu0, cpu1, cpu2, agg["tokens"], t2 - t1, len(conns))
        self.result.steps.append(res)
        return res

    def _cpu(self, before_connect: cpu.Snapshot, before: cpu.Snapshot, after: cpu.Snapshot,
             tokens: int, window_s: float, sockets: int) -> dict[str, Any]:
        used = cpu.delta(before, after)
        mock_s = used.pop("mock", 0.0)
        total = sum(used.values())
        idle = sum(self.idle.values()) * window_s
        per = 1e6 / tokens if tokens else 0.0
        connect_used = cpu.delta(before_connect, before)
        connect_used.pop("mock", None)
        connect = sum(connect_used.values())
        return {"seconds": used, "total_s": total, "tokens": tokens,
                "us_per_token": total * per if tokens else None,
                "us_per_token_by_role": {k: v * per for k, v in used.items()} if tokens else {},
                "idle_s": idle, "net_us_per_token": max(0.0, total - idle) * per
                if tokens else None,
                "connect_s": connect, "connect_us_per_socket": connect * 1e6 / sockets
                if sockets else None, "mock_s": mock_s, "window_s": window_s}

    async def _warm_up(self, direct: DirectClient | None) -> None:
        """A few short requests per target first, so first-use costs do not land in step 1."""
        n = self.cfg.warmup
        if n <= 0:
            return
        prompt = Prompt([{"role": "user", "content": "warm up"}], min(2, self.cfg.output_tokens))
        targets: list[tuple[str, Sequence[Lane], list[Any]]] = []
        if self.urls:
            conns = await open_conns(self.urls, max(n, len(self.urls)), self.cfg.model,
                                     self.headers, None)
            targets.append(("sluice", conns, conns))
        if self.http is not None:
            targets.append(("http", [self.http] * n, []))
        if direct is not None:
            targets.append(("direct", [direct] * n, []))
        for name, lanes, closers in targets:
            sink: array[float] = array("d")
            streams = [Stream(RequestRecord(name, -1, i, i), prompt, sink, None, False)
                       for i in range(len(lanes))]
            await asyncio.gather(*(lane.request(s, perf_counter(), self.cfg.timeout_s)
                                   for lane, s in zip(lanes, streams, strict=True)))
            await asyncio.gather(*(c.close() for c in closers))
            failed = [s.rec for s in streams if not s.rec.ok]
            if len(failed) == len(streams):
                where = {"sluice": ", ".join(self.urls), "http": ", ".join(self.http_urls)
                         }.get(name, self.direct_url)
                raise BenchError(f"every warm-up request to {where} failed: "
                                 f"{failed[0].error}: {failed[0].message}")

    async def _measure_idle(self, seconds: float = 1.0) -> None:
        """CPU the stack burns while idle (timers, heartbeats), to report a net figure."""
        assert self.stack is not None
        roles = self.stack.roles()
        before = cpu.snapshot(roles)
        t = perf_counter()
        await asyncio.sleep(seconds)
        used = cpu.delta(before, cpu.snapshot(roles))
        self.idle = {k: v / (perf_counter() - t) for k, v in used.items()}


def http_base(ws_url: str) -> str:
    """The OpenAI-compatible base URL of the front end at ``ws_url`` (``ws://h:p/ws`` → ``http://h:p/v1``)."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/v1", "", ""))
