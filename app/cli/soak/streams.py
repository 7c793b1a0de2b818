"""Client streams that survive front-end deaths and check every event they get.

Each stream runs jobs one after another on its own WebSocket.  When the
socket drops it reconnects to any live front end and sends ``resume`` with
the last seq it has, so a job's events must arrive exactly once and in order
whatever dies in between.  Every job's seq run is checked (a gap counts as
lost events, a repeat as duplicated) and a job that ends ``done`` must carry
exactly the mock model's deterministic text.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from app.cli.dev.mockllm import MockConfig, expected_text

#: What a job does besides streaming: nothing, a ``cancel`` after a few tokens,
#: or a voluntary disconnect after a few tokens followed by ``resume``.
ACTIONS = ("plain", "cancel", "drop")


@dataclass
class Job:
    """One job as its client saw it."""

    prompt: str
    max_tokens: int
    action: str = "plain"
    job_id: str | None = None
    last_seq: int = -1
    text: str = ""
    tokens: int = 0
    restarts: int = 0
    lost: int = 0
    duplicated: int = 0
    resumes: int = 0
    end: dict[str, Any] | None = None
    #: Set when the job never got ``queued`` (its front end died first); it is
    #: submitted again as a new job.
    unacknowledged: bool = False

    def take(self, frame: dict[str, Any]) -> None:
        """Apply one of the job's event frames, checking its seq."""
        seq = frame["seq"]
        if seq <= self.last_seq:
            self.duplicated += 1
            return
        self.lost += seq - self.last_seq - 1
        self.last_seq = seq
        kind = frame["type"]
        if kind == "token":
            self.text += frame["text"]
            self.tokens += 1
        elif kind == "restart":
            self.text = ""
            self.restarts += 1
        elif kind in ("done", "error"):
            self.end = frame

    def verdict(self, config: MockConfig) -> str:
        """How the job ended: ``done``, ``cancelled``, ``error:<code>``, ``wrong_text``,
        ``open`` (no end seen) or ``unacknowledged``."""
        if self.unacknowledged:
            return "unacknowledged"
        if self.end is None:
            return "open"
        if self.end["type"] == "error":
            code = str(self.end.get("code"))
            return "cancelled" if code == "cancelled" and self.action == "cancel" \
                else f"error:{code}"
        if self.text != expected_text(self.prompt, self.max_tokens, config):
            return "wrong_text"
        return "done"


@dataclass
class Tally:
    """What a fleet of streams saw."""

    jobs: list[Job] = field(default_factory=list)
    #: Requests refused before they became jobs, by error code.
    refused: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0

    def verdicts(self, config: MockConfig) -> Counter[str]:
        """How many jobs ended each way."""
        return Counter(job.verdict(config) for job in self.jobs)

    @property
    def lost(self) -> int:
        """Events missing from seq runs, over all jobs."""
        return sum(job.lost for job in self.jobs)

    @property
    def duplicated(self) -> int:
        """Events received twice, over all jobs."""
        return sum(job.duplicated for job in self.jobs)

    def summary(self, config: MockConfig) -> dict[str, Any]:
        """Figures for a report."""
        return {"jobs": len(self.jobs), "verdicts": dict(self.verdicts(config)),
                "refused": dict(self.refused), "lost_events": self.lost,
                "duplicated_events": self.duplicated, "reconnects": self.reconnects,
                "restarts": sum(j.restarts for j in self.jobs),
                "resumes": sum(j.resumes for j in self.jobs),
                "tokens": sum(j.tokens for j in self.jobs)}


class Fleet:
    """``streams`` clients sending jobs back to back until told to stop.

    Example::

        fleet = Fleet(lambda: stack.urls, stack.api_key, "mock-1", streams=200)
        tally = asyncio.run(fleet.run(submit_for_s=60, drain_s=60))
    """

    def __init__(self, urls: Callable[[], list[str]], api_key: str, model: str, streams: int,
                 *, max_tokens: Iterable[int] = (20, 30, 40), mix: dict[str, float] | None = None,
                 seed: int = 0, job_timeout_s: float = 120.0) -> None:
        self.urls = urls
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.model = model
        self.streams = streams
        self.max_tokens = tuple(max_tokens)
        self.mix = mix or {"plain": 1.0}
        self.rng = random.Random(seed)
        self.job_timeout_s = job_timeout_s
        self.tally = Tally()
        self._submit_until = 0.0
        self._sockets: dict[int, ClientConnection] = {}

    async def run(self, submit_for_s: float, drain_s: float) -> Tally:
        """Send jobs for ``submit_for_s``, then let open jobs finish for up to ``drain_s``."""
        self._submit_until = time.monotonic() + submit_for_s
        tasks = [asyncio.create_task(self._stream(i)) for i in range(self.streams)]
        done, pending = await asyncio.wait(tasks, timeout=submit_for_s + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the client must fail loudly, not count as a lost job
        return self.tally

    async def _stream(self, index: int) -> None:
        n = 0
        try:
            while time.monotonic() < self._submit_until:
                action = self.rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
                job = Job(f"stream {index} job {n}: tell me something",
                          self.rng.choice(self.max_tokens), action)
                n += 1
                self.tally.jobs.append(job)
                await self._run(index, job)
        finally:
            await self._drop(index)

    async def _drop(self, index: int) -> None:
        ws = self._sockets.pop(index, None)
        if ws is not None:
            await ws.close()

    async def _run(self, index: int, job: Job) -> None:
        """Drive one job to its end on the stream's socket, reconnecting as often as needed."""
        deadline = time.monotonic() + self.job_timeout_s
        acted = False
        while job.end is None and time.monotonic() < deadline:
            ws = self._sockets.get(index)
            if ws is None:
                ws = await self._connect(deadline)
                if ws is None:
                    return
                self._sockets[index] = ws
                self.tally.reconnects += 1
            try:
                if job.job_id is None:
                    if not await self._submit(ws, job):
                        return  # refused: counted, and no job to follow
                else:
                    await ws.send(json.dumps({"type": "resume", "job_id": job.job_id,
                                              "after": job.last_seq}))
                    job.resumes += 1
                while job.end is None:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), deadline -
                                                              time.monotonic()))
                    if frame.get("type") == "error" and "seq" not in frame:
                        if frame.get("code") != "unavailable":
                            job.end = frame  # the resume was refused: the job is lost
                            break
                        await asyncio.sleep(0.5)  # Redis is away for a moment: ask again
                        await ws.send(json.dumps({"type": "resume", "job_id": job.job_id,
                                                  "after": job.last_seq}))
                        continue
                    if frame.get("job_id") != job.job_id or "seq" not in frame:
                        continue
                    job.take(frame)
                    if not acted and job.tokens >= 3 and job.action != "plain":
                        acted = True
                        if job.action == "cancel":
                            await ws.send(json.dumps({"type": "cancel", "job_id": job.job_id}))
                        else:
                            await self._drop(index)
                            break
            except (ConnectionClosed, OSError):
                await self._drop(index)
                if job.job_id is None:
                    # queued never came: the job may exist, but nobody can name it.
                    job.unacknowledged = True
                    return
            except TimeoutError:
                break

    async def _submit(self, ws: ClientConnection, job: Job) -> bool:
        await ws.send(json.dumps({"type": "generate", "ref": 1, "prompt": job.prompt,
                                  "model": self.model, "max_tokens": job.max_tokens}))
        early: list[dict[str, Any]] = []
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "queued":
                job.job_id = frame["job_id"]
                for f in early:
                    if f.get("job_id") == job.job_id:
                        job.take(f)
                return True
            if frame.get("type") == "error" and "seq" not in frame:
                self.tally.refused[str(frame.get("code"))] += 1
                self.tally.jobs.remove(job)
                return False
            if "seq" in frame:
                early.append(frame)  # a fast job's first events may beat its 'queued'

    async def _connect(self, deadline: float) -> ClientConnection | None:
        while time.monotonic() < deadline:
            urls = self.urls()
            if urls:
                try:
                    return await connect(self.rng.choice(urls), additional_headers=self.headers,
                                         open_timeout=5, ping_interval=None, close_timeout=1,
                                         max_size=2**22, proxy=None)
                except (OSError, TimeoutError, InvalidHandshake):
                    pass  # that front end is gone or not up yet: try another
            await asyncio.sleep(0.2 + self.rng.random() * 0.3)
        return None
