"""Load modes: sockets released together, fixed concurrency, constant rate, gamma arrivals."""

from __future__ import annotations

import asyncio
import random
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol, TextIO

from app.cli.bench.config import Step
from app.cli.bench.record import RequestRecord, Stream


class Lane(Protocol):
    """Something that can carry one request at a time: a socket or an SDK client."""

    async def request(self, stream: Stream, t_step0: float, timeout_s: float) -> None:
        """Send the request and wait for its end."""


#: Makes the stream of request number ``index`` sent on lane ``lane``.
NewStream = Callable[[int, int], Stream]


@dataclass
class Counters:
    """Live numbers of the running step, for the progress line."""

    label: str = ""
    total: int = 0
    sent: int = 0
    done: int = 0
    errors: int = 0
    streams: list[Stream] = field(default_factory=list)

    def ended(self, rec: RequestRecord) -> None:
        """Count one request that ended."""
        self.done += 1
        if not rec.ok:
            self.errors += 1

    @property
    def frames(self) -> int:
        """Token frames received so far in this step."""
        return sum(s.rec.frames for s in self.streams)


@dataclass
class StepLoad:
    """What running one step's load produced."""

    records: list[RequestRecord] = field(default_factory=list)
    lag_ms: array[float] = field(default_factory=lambda: array("d"))
    wall_s: float = 0.0
    interrupted: bool = False


async def run_load(step: Step, lanes: Sequence[Lane], new_stream: NewStream, timeout_s: float,
                   stop: asyncio.Event, counters: Counters, seed: int = 0) -> StepLoad:
    """Run one step's load over ``lanes`` and return every request's record.

    Bounded by ``step.requests`` and ``step.duration_s`` (no new request after
    it), each request by ``timeout_s``; ``stop`` (Ctrl-C) cancels what is in
    flight and returns what was measured.
    """
    out = StepLoad()
    t0 = perf_counter()
    deadline = t0 + step.duration_s
    streams: list[Stream] = []
    counters.streams = streams
    tasks: set[asyncio.Task[None]] = set()

    async def one(lane: Lane, lane_no: int) -> None:
        stream = new_stream(len(streams), lane_no)
        streams.append(stream)
        counters.sent += 1
        try:
            await lane.request(stream, t0, timeout_s)
        finally:
            if stream.rec.finish is None and stream.rec.error is None:
                stream.fail("interrupted", "the run was interrupted", perf_counter())
            counters.ended(stream.rec)

    async def serial(lane: Lane, lane_no: int) -> None:
        while counters.sent < step.requests and perf_counter() < deadline \
                and not stop.is_set():
            await one(lane, lane_no)

    async def arrivals() -> None:
        rng = random.Random(seed)
        shape = step.burstiness
        at = perf_counter()
        for i in range(step.requests):
            if step.kind == "poisson":
                at += rng.gammavariate(shape, 1.0 / (step.value * shape))
            elif i:
                at += 1.0 / step.value
            if at > deadline or stop.is_set():
                break
            delay = at - perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            spawn(one(lanes[i % len(lanes)], i % len(lanes)))

    def spawn(coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    lag = asyncio.create_task(_watch_lag(out.lag_ms))
    if step.kind == "sockets":
        for i, lane in enumerate(lanes[:step.requests]):
            spawn(one(lane, i))
    elif step.kind == "concurrency":
        for i, lane in enumerate(lanes):
            spawn(serial(lane, i))
    else:
        await _until_stopped(asyncio.create_task(arrivals()), stop)
    while tasks and not stop.is_set():
        await _until_stopped(asyncio.gather(*tasks, return_exceptions=True), stop)
    if stop.is_set():
        out.interrupted = True
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lag.cancel()
    ends = [s.rec.t_send_s + (s.rec.e2e_ms or 0) / 1000 for s in streams]
    out.wall_s = max(ends, default=0.0) - min((s.rec.t_send_s for s in streams), default=0.0)
    out.records = [s.rec for s in streams]
    return out


async def _until_stopped(fut: asyncio.Future[Any],
                         stop: asyncio.Event) -> None:
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({fut, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not fut.done():
        fut.cancel()
        await asyncio.gather(fut, return_exceptions=True)


async def _watch_lag(sink: array[float], period_s: float = 0.02) -> None:
    # How late the bench's own event loop wakes up: if this grows, the client,
    # not the system under test, is adding latency.
    while True:
        t = perf_counter()
        await asyncio.sleep(period_s)
        sink.append(max(0.0, (perf_counter() - t - period_s) * 1000))


async def show_progress(counters: Counters, stream: TextIO = sys.stderr) -> None:
    """Rewrite one status line about 4 times a second (every 2 s when not a terminal)."""
    tty = stream.isatty()
    period = 0.25 if tty else 2.0
    last_frames, last_t = counters.frames, perf_counter()
    rate = 0.0
    try:
        while True:
            await asyncio.sleep(period)
            now = perf_counter()
            frames = counters.frames
            rate = 0.5 * rate + 0.5 * (frames - last_frames) / max(1e-6, now - last_t)
            last_frames, last_t = frames, now
            line = (f"[{counters.label}] done {counters.done}/{counters.total}  in flight "
                    f"{counters.sent - counters.done}  {rate:,.0f} tok/s  "
                    f"errors {counters.errors}") if counters.total else f"[{counters.label}]"
            stream.write(f"\r\x1b[2K{line}" if tty else line + "\n")
            stream.flush()
    finally:
        if tty:
            stream.write("\r\x1b[2K")
            stream.flush()
