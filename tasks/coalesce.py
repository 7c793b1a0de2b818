"""Calls that arrive together go to Redis together: one pipeline round trip for many callers.

Both batchers of the hot path are built on it: the workers' event appends
(:class:`tasks.events.AppendBatcher`) and the front ends' job starts
(:class:`tasks.queue.StartBatcher`).  The first call of an idle period goes
out at once, in its own round trip (no added latency); calls made while one
is in flight gather and go out together in the next.  Needs gevent.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import gevent
import redis
from gevent.event import AsyncResult, Event
from redis.commands.core import Script

T = TypeVar("T")

log = logging.getLogger(__name__)


class Coalescer(Generic[T]):
    """Runs items in batches of at most ``max_batch``, one sender greenlet per process.

    ``run`` takes a batch and returns one reply per item, in order; a reply
    that is an exception is raised to that item's caller alone.  If ``run``
    itself raises, every caller of the batch gets the error (as a
    ``redis.RedisError``).  A caller that does not need the reply hands
    its item to :meth:`submit` and goes on; its errors are logged.

    Example::

        coalescer = Coalescer(lambda batch: run_scripts(client, [...]), max_batch=256)
        reply = coalescer.call(item, what="append of job 42")
    """

    def __init__(self, run: Callable[[list[T]], Sequence[Any]], max_batch: int,
                 timeout_s: float = 30.0) -> None:
        self.run = run
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        # (item, where its reply goes or None, what it is)
        self.queue: deque[tuple[T, AsyncResult | None, str]] = deque()
        self.wakeup = Event()
        self.sender: gevent.Greenlet | None = None

    def call(self, item: T, what: str) -> Any:
        """Run ``item`` in the next batch and return its reply.

        :param what: names the call in the timeout's message.
        :raises redis.TimeoutError: no reply within ``timeout_s``.
        :raises Exception: the item's own error, or the batch's.
        """
        result: AsyncResult = AsyncResult()
        self._put(item, result, what)
        try:
            return result.get(timeout=self.timeout_s)
        except gevent.Timeout as e:
            raise redis.TimeoutError(f"{what} got no reply") from e

    def submit(self, item: T, what: str) -> None:
        """Run ``item`` in the next batch without waiting; a failure is logged, naming ``what``."""
        self._put(item, None, what)

    def _put(self, item: T, result: AsyncResult | None, what: str) -> None:
        self.queue.append((item, result, what))
        self.wakeup.set()
        if self.sender is None or self.sender.dead:
            self.sender = gevent.spawn(self._send)

    def _send(self) -> None:
        while True:
            if not self.queue:
                self.wakeup.clear()
                self.wakeup.wait()
                continue
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), self.max_batch))]
            try:
                replies = self.run([item for item, _, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiting caller must hear of it
                failure = e if isinstance(e, redis.RedisError) else redis.RedisError(repr(e))
                replies = [failure] * len(batch)
            for (_, result, what), reply in zip(batch, replies, strict=True):
                if result is None:
                    if isinstance(reply, BaseException):
                        log.warning("%s failed: %r", what, reply)
                elif isinstance(reply, BaseException):
                    result.set_exception(reply)
                else:
                    result.set(reply)


def run_scripts(client: redis.Redis, calls: Sequence[tuple[Script, list[str], list[Any]]]
                ) -> list[Any]:
    """Run Lua scripts in one pipeline round trip; their replies, in order.

    EVALSHA directly: a pipeline running ``Script`` objects would first ask
    ``SCRIPT EXISTS``, one more round trip per batch.  On ``NOSCRIPT`` (Redis
    restarted, or a script's first use) the scripts are loaded and the whole
    batch runs again, so it must be safe to run again: all its calls run one
    script (then a refused EVALSHA means none ran), or each names what it
    expects (as appends name their seq).
    """
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for script, keys_, args in calls:
            pipe.evalsha(script.sha, len(keys_), *keys_, *args)
        try:
            return list(pipe.execute())
        except redis.exceptions.NoScriptError:
            if attempt:
                raise
            for script in {call[0] for call in calls}:
                client.script_load(script.script)
    raise AssertionError("unreachable")
