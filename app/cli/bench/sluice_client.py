"""The Sluice target: WebSocket connections that multiplex jobs and time every frame.

Token frames are the hot path (thousands per second): they are read with
string slicing, not ``json.loads``, relying on the layout the event log
renders (``{"type":"token","job_id":"…","seq":N,"text":"…"}``) and falling
back to the JSON parser for anything else.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from time import perf_counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from app.cli.bench.config import BenchError
from app.cli.bench.record import Stream

TOKEN_HEAD = '{"type":"token","job_id":"'
_HEAD_LEN = len(TOKEN_HEAD)
_Entry = tuple[Stream, "asyncio.Future[None]"]


class SluiceConn:
    """One client WebSocket; any number of jobs may be in flight on it."""

    def __init__(self, index: int, url: str, model: str,
                 counted: Callable[[str], int] | None) -> None:
        self.index = index
        self.url = url
        self.model = model
        self.counted = counted
        self.ws: ClientConnection | None = None
        self.failure: str | None = None
        self._next_ref = 0
        self._by_ref: dict[int, _Entry] = {}
        self._by_job: dict[str, _Entry] = {}
        self._orphans: dict[str, list[tuple[str, float]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def open(self, headers: dict[str, str], timeout_s: float) -> None:
        """Open the socket; on failure remember why in :attr:`failure` instead of raising."""
        try:
            self.ws = await connect(
                self.url, additional_headers=headers or None, compression=None, proxy=None,
                open_timeout=timeout_s, ping_interval=None, close_timeout=2,
                max_size=2**24, max_queue=1024, user_agent_header="sluice-bench")
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
            self.failure = describe(e)
            return
        self._reader = asyncio.create_task(self._read())

    async def request(self, stream: Stream, t_step0: float, timeout_s: float) -> None:
        """Send one ``generate`` and wait until its job ends (or fails, or times out)."""
        prompt = stream.prompt
        ref = self._next_ref
        self._next_ref += 1
        text = json.dumps({"type": "generate", "ref": ref, "model": self.model,
                           "max_tokens": prompt.max_tokens, **prompt.wire()})
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream.sent(t_step0)
        if self.ws is None or self.failure:
            stream.fail("connect_failed", self.failure or "not connected", perf_counter())
            return
        self._by_ref[ref] = (stream, fut)
        try:
            await self.ws.send(text)
            await asyncio.wait_for(fut, timeout_s)
        except ConnectionClosed as e:
            stream.fail("connection_closed", describe(e), perf_counter())
        except TimeoutError:
            stream.fail("timeout", f"no end of the job within {timeout_s:g} s", perf_counter())
            await self._cancel(stream)
        finally:
            self._by_ref.pop(ref, None)

    async def close(self) -> None:
        """Close the socket and stop reading."""
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 3)
            except (TimeoutError, OSError, ConnectionClosed):
                pass
        if self._reader is not None:
            self._reader.cancel()

    async def _cancel(self, stream: Stream) -> None:
        for job_id, (s, _) in list(self._by_job.items()):
            if s is stream:
                del self._by_job[job_id]
                if self.ws is not None:
                    try:
                        await self.ws.send(json.dumps({"type": "cancel", "job_id": job_id}))
                    except ConnectionClosed:
                        pass

    async def _read(self) -> None:
        assert self.ws is not None
        reason = "the server closed the socket"
        try:
            async for msg in self.ws:
                now = perf_counter()
                if isinstance(msg, bytes):
                    continue
                if msg.startswith(TOKEN_HEAD) and self._token(msg, now):
                    continue
                self._frame(msg, now)
        except ConnectionClosed as e:
            reason = describe(e)
        finally:
            self.failure = self.failure or reason
            for table in (self._by_ref, self._by_job):
                for stream, fut in table.values():
                    stream.fail("connection_closed", reason, perf_counter())
                    if not fut.done():
                        fut.set_result(None)

    def _token(self, msg: str, now: float) -> bool:
        i = msg.find('","seq":', _HEAD_LEN)
        j = msg.find(",", i + 8)
        if i < 0 or j < 0 or not msg.startswith(',"text":"', j) or not msg.endswith('"}'):
            return False
        job_id = msg[_HEAD_LEN:i]
        entry = self._by_job.get(job_id)
        if entry is None:
            self._orphans.setdefault(job_id, []).append((msg, now))
            return True
        stream = entry[0]
        if stream.seq(int(msg[i + 8:j])):
            raw = msg[j + 9:-2]
            stream.token(json.loads(msg[j + 8:-1]) if "\\" in raw else raw, now)
        return True

    def _frame(self, msg: str, now: float) -> None:
        try:
            frame: dict[str, Any] = json.loads(msg)
        except ValueError:
            return
        kind = frame.get("type")
        job_id = frame.get("job_id")
        if kind == "queued":
            entry = self._by_ref.pop(frame.get("ref"), None)  # type: ignore[arg-type]
            if entry is not None and isinstance(job_id, str):
                self._by_job[job_id] = entry
                for early, t in self._orphans.pop(job_id, ()):
                    if not self._token(early, t):
                        self._frame(early, t)
            return
        if not isinstance(job_id, str):
            if kind == "error":  # the request never became a job
                entry = self._by_ref.pop(frame.get("ref"), None)  # type: ignore[arg-type]
                if entry is not None:
                    entry[0].fail(str(frame.get("code")), str(frame.get("message", "")), now)
                    _resolve(entry[1])
            return
        entry = self._by_job.get(job_id)
        if entry is None:
            self._orphans.setdefault(job_id, []).append((msg, now))
            return
        stream, fut = entry
        seq = frame.get("seq")
        if isinstance(seq, int) and not stream.seq(seq):
            return
        if kind == "token":
            stream.token(str(frame.get("text", "")), now)
        elif kind == "restart":
            stream.restart()
        elif kind in ("done", "error"):
            del self._by_job[job_id]
            if kind == "done":
                _done(stream, frame, now, self.counted)
            else:
                stream.fail(str(frame.get("code")), str(frame.get("message", "")), now)
            _resolve(fut)


def _done(stream: Stream, frame: dict[str, Any], now: float,
          counted: Callable[[str], int] | None) -> None:
    usage = frame.get("usage") or {}
    metrics = frame.get("metrics") or {}
    rec = stream.rec
    rec.prompt_tokens = usage.get("prompt_tokens")
    rec.queue_ms = metrics.get("queue_wait_ms")
    rec.server_ttft_ms = metrics.get("provider_ttft_ms")
    rec.server_tpot_ms = metrics.get("tpot_ms")
    stream.finish(frame.get("finish_reason"), usage.get("completion_tokens"), now, counted)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def describe(e: BaseException) -> str:
    """A one-line reason for a connection problem."""
    if isinstance(e, ConnectionClosed):
        rcvd = e.rcvd
        return (f"closed by the server with code {rcvd.code}" + (f" ({rcvd.reason})"
                if rcvd.reason else "")) if rcvd else "the connection dropped"
    if isinstance(e, OSError) and (e.errno or e.strerror):
        return os.strerror(e.errno).lower() if e.errno else str(e.strerror)
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


async def open_conns(urls: tuple[str, ...], n: int, model: str, headers: dict[str, str],
                     counted: Callable[[str], int] | None,
                     timeout_s: float = 15.0, parallel: int = 200) -> list[SluiceConn]:
    """Open ``n`` sockets spread round-robin over ``urls``, ``parallel`` handshakes at a time."""
    conns = [SluiceConn(i, urls[i % len(urls)], model, counted) for i in range(n)]
    gate = asyncio.Semaphore(parallel)

    async def one(c: SluiceConn) -> None:
        async with gate:
            await c.open(headers, timeout_s)

    await asyncio.gather(*(one(c) for c in conns))
    return conns


async def probe(url: str, headers: dict[str, str], timeout_s: float = 10.0) -> None:
    """Open and close one socket.

    :raises BenchError: the server cannot be reached or refuses the handshake.
    """
    conn = SluiceConn(0, url, "", None)
    await conn.open(headers, timeout_s)
    if conn.failure:
        raise BenchError(f"cannot open a WebSocket to {url}: {conn.failure}")
    await conn.close()
