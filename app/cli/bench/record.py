"""Per-request measurement: timestamps, the seq check and the text check."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields
from time import perf_counter
from typing import Any

from app.cli.bench.prompts import Prompt


@dataclass(slots=True)
class RequestRecord:
    """What one request measured; times are milliseconds, ``t_send_s`` is from the step's start."""

    target: str
    step: int
    index: int
    conn: int
    t_send_s: float = 0.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_mean_ms: float | None = None
    itl_max_ms: float | None = None
    frames: int = 0
    tokens: int = 0
    prompt_tokens: int | None = None
    max_tokens: int = 0
    queue_ms: float | None = None
    server_ttft_ms: float | None = None
    server_tpot_ms: float | None = None
    finish: str | None = None
    error: str | None = None
    message: str | None = None
    lost: int = 0
    dup: int = 0
    mismatch: bool = False
    restarts: int = 0

    @property
    def ok(self) -> bool:
        """Whether the request completed without an error."""
        return self.error is None and self.finish is not None

    def as_json(self) -> dict[str, Any]:
        """The record as a dict with rounded floats."""
        return {f.name: _round(getattr(self, f.name)) for f in fields(self)}


def _round(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else v


class Stream:
    """Follows one request's frames: times each one, checks seq order and collects the text.

    :param itl_sink: the step's list of inter-frame gaps in ms; this stream appends its own.
    """

    __slots__ = ("expected", "itl_sink", "keep_text", "last", "n_seq", "parts", "prompt", "rec",
                 "t0", "t_first")

    def __init__(self, rec: RequestRecord, prompt: Prompt, itl_sink: array[float],
                 expected: str | None, keep_text: bool) -> None:
        self.rec = rec
        self.prompt = prompt
        self.itl_sink = itl_sink
        self.expected = expected
        self.keep_text = keep_text
        self.parts: list[str] = []
        self.n_seq = 0
        self.t0 = 0.0
        self.t_first = 0.0
        self.last = 0.0

    def sent(self, t_step0: float) -> None:
        """Call right before the request goes out."""
        self.t0 = perf_counter()
        self.rec.t_send_s = self.t0 - t_step0
        self.rec.max_tokens = self.prompt.max_tokens

    def seq(self, seq: int) -> bool:
        """Check one event's seq; return whether it is new (a repeat is counted and dropped)."""
        if seq != self.n_seq:
            if seq < self.n_seq:
                self.rec.dup += 1
                return False
            self.rec.lost += seq - self.n_seq
        self.n_seq = seq + 1
        return True

    def token(self, text: str, now: float) -> None:
        """One frame or chunk carrying text arrived at ``now`` (perf_counter seconds)."""
        rec = self.rec
        if rec.frames == 0:
            self.t_first = now
            rec.ttft_ms = (now - self.t0) * 1000
        else:
            gap = (now - self.last) * 1000
            self.itl_sink.append(gap)
            if rec.itl_max_ms is None or gap > rec.itl_max_ms:
                rec.itl_max_ms = gap
        self.last = now
        rec.frames += 1
        if self.keep_text:
            self.parts.append(text)

    def restart(self) -> None:
        """The job is being re-run: the text so far is void."""
        self.rec.restarts += 1
        self.parts.clear()

    def finish(self, reason: str | None, completion_tokens: int | None, now: float,
               counted: Callable[[str], int] | None = None) -> None:
        """The request ended well; derive TPOT, ITL summary and the text check."""
        rec = self.rec
        rec.finish = reason or "stop"
        rec.e2e_ms = (now - self.t0) * 1000
        text = "".join(self.parts) if self.keep_text else None
        n = completion_tokens
        if n is None and text is not None and counted is not None:
            n = counted(text)
        rec.tokens = n if n is not None else rec.frames
        if rec.frames > 1:
            span = (self.last - self.t_first) * 1000
            rec.itl_mean_ms = span / (rec.frames - 1)
            rec.tpot_ms = span / (rec.tokens - 1) if rec.tokens > 1 else None
        if text is not None:
            if self.expected is not None:
                rec.mismatch = text != self.expected
            elif counted is not None and completion_tokens is not None:
                rec.mismatch = counted(text) != completion_tokens

    def fail(self, code: str, message: str, now: float) -> None:
        """The request ended with an error."""
        rec = self.rec
        if rec.error is None and rec.finish is None:
            rec.error, rec.message = code, message[:300]
            rec.e2e_ms = (now - self.t0) * 1000 if self.t0 else None
            rec.tokens = rec.frames
