"""The bulk engine: many items submitted at once, held in order, started as limits allow.

This is the front end's side (submit, follow, cancel, look); the pump on the
workers (:mod:`tasks.pump`) starts the held items.  An item is an ordinary
job: its job id is known when it is submitted (see :func:`item_job_id`), it
is admitted, stored, run, streamed, billed and settled like any job, on the
bulk queue.  A bulk *announced* (a socket's) also has its own event log, with
the job id :func:`log_id`, which a client follows like a job's: ``held``
events (how many items wait, where the next one stands in its key's queue,
and when it should start) and a final ``bulk_done`` with the counts.  Items
that end without running (cancelled or refused while held) get an ``error``
event in their own log, so a follower of every item sees every item end.

Example::

    engine = BulkEngine(client, settings, admission, jobs, events)
    sub = engine.submit(key, [Held(spec_a), Held(spec_b)])
    sub.jobs            # ['<job id>', ItemError('model_not_allowed', '…')]
    engine.status(sub.bulk_id).record.done
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import redis

from tasks import keys
from tasks.admission import Admission, AdmissionRejectedError, KeyLike
from tasks.bulk_store import (
    LOG_INDEX,
    BulkRecord,
    BulkStore,
    Held,
    item_job_id,
    log_id,
    new_bulk_id,
    split_job_id,
)
from tasks.config import Settings
from tasks.events import EventLog
from tasks.jobs import JOB_ID, JobStore
from tasks.outcome import Outcome

__all__ = ["BulkEngine", "BulkRejectedError", "BulkStatus", "Held", "ItemError",
           "Submission", "UnknownBulkError", "eta_s", "item_job_id", "log_id"]


class BulkRejectedError(Exception):
    """A whole submission refused; ``code`` is stable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UnknownBulkError(LookupError):
    """No such bulk or item for this key (another key's looks the same: ids do not leak)."""


@dataclass(frozen=True)
class ItemError:
    """Why one item of a submission was refused (the others go on)."""

    code: str
    message: str


@dataclass(frozen=True)
class Submission:
    """A bulk accepted: its id, its log's id, and per item its job id or its refusal."""

    bulk_id: str
    #: The job id of the bulk's own event log (``held``, ``bulk_done``); announced bulks only.
    log_id: str
    jobs: list[str | ItemError]


@dataclass(frozen=True)
class BulkStatus:
    """Where a bulk stands."""

    record: BulkRecord
    #: Items of the key's earlier bulks still held ahead of this bulk's next item.
    position: int
    #: Seconds until the next held item should start, and the last; ``None`` until the
    #: key's items have started at a measurable rate.
    next_eta_s: float | None
    last_eta_s: float | None


def eta_s(position: int, starts_ms: list[int], now_ms: int,
          not_before_ms: int | None) -> float | None:
    """When the item ``position`` places behind the key's next one should start.

    Estimated from how fast the key's items started lately (``starts_ms``,
    newest first) plus any wait its limits impose now; ``None`` before two
    items have started.
    """
    if len(starts_ms) < 2 or starts_ms[0] <= starts_ms[-1]:
        return None
    per_s = (len(starts_ms) - 1) / ((starts_ms[0] - starts_ms[-1]) / 1000)
    wait = max(0, (not_before_ms or now_ms) - now_ms) / 1000
    return round(wait + position / per_s, 1)


class BulkEngine:
    """Submits, follows and cancels bulks for the front ends; the pump starts their items."""

    def __init__(self, client: redis.Redis, settings: Settings, admission: Admission,
                 jobs: JobStore, events: EventLog) -> None:
        self.redis = client
        self.settings = settings
        self.admission = admission
        self.jobs = jobs
        self.events = events
        self.store = BulkStore(client, settings.batch_retention_s)

    def submit(self, key: KeyLike, items: Sequence[Held], *, kind: str = "bulk",
               announce: bool = True, keep: bool = False, max_items: int | None = None,
               bulk_id: str | None = None, wait_s: int | None = None) -> Submission:
        """Accept a bulk: every valid item is held, in order, until the pump starts it.

        :param key: the submitting key; its tier's limits and ``batch_share`` apply.
        :param items: the requests, each already validated as a ``generate`` would be.
        :param kind: ``bulk`` (a socket's), ``batch`` (the Batch API's) or ``interactive``
            (a ``generate`` held instead of refused: the pump starts it as an interactive
            job, and if it expires it ends with ``rate_limited``).
        :param announce: keep the bulk's own event log (``held``, ``bulk_done``).
        :param keep: keep each item's outcome (the Batch API renders files from them).
        :param max_items: most items in this submission (default ``settings.bulk_max_items``).
        :param bulk_id: the id to use (24 hex digits); a new one when ``None``.
        :param wait_s: how long items may wait to start (default ``settings.bulk_max_wait_s``).
        :return: the bulk's ids and, per item, its job id or why it was refused.
        :raises BulkRejectedError: ``too_many_items``, or ``too_many_pending`` when the key
            has ``settings.bulk_max_pending`` items pending already.
        :raises redis.RedisError: Redis cannot be reached (nothing was held).
        """
        limit = self.settings.bulk_max_items if max_items is None else max_items
        if len(items) > limit:
            raise BulkRejectedError("too_many_items", f"{len(items)} items; at most {limit} "
                                    "may be submitted at once")
        bid = bulk_id or new_bulk_id()
        valid: list[Held] = []
        jobs: list[str | ItemError] = []
        for n, item in enumerate(items):
            if n % 500 == 499:
                gevent.sleep(0)  # a big batch must not stall the front end's other sockets
            error = self._refusal(key, item)
            if error is None:
                jobs.append(item_job_id(bid, len(valid)))
                valid.append(item)
            else:
                jobs.append(error)
        wait_s = self.settings.bulk_max_wait_s if wait_s is None else wait_s
        ticket = self.store.submit(
            bid, key.key_id, valid, max_pending=self.settings.bulk_max_pending,
            ttl_s=wait_s + self.settings.batch_retention_s,
            log_key=keys.job(log_id(bid)) if announce else None,
            fields={"tier": key.tier, "kind": kind, "wait_ms": wait_s * 1000,
                    "announce": int(announce), "keep": int(keep)})
        if ticket is None:
            raise BulkRejectedError("too_many_pending", f"this key has too many items waiting "
                                    f"or running; at most {self.settings.bulk_max_pending}")
        self.redis.publish(keys.BULK_WAKE, "")
        return Submission(bid, log_id(bid), jobs)

    def _refusal(self, key: KeyLike, item: Held) -> ItemError | None:
        if item.spec.session:
            return ItemError("bad_field", "bulk items cannot use 'session'")
        try:
            self.admission.precheck(key, item.spec, max_tokens_given=item.max_tokens_given)
        except AdmissionRejectedError as e:
            return ItemError(e.code, e.message)
        return None

    def owner_of(self, some_id: str) -> str | None:
        """The key id owning a bulk, one of its items' jobs, or its log; ``None`` otherwise."""
        if JOB_ID.match(some_id):
            some_id = split_job_id(some_id)[0]
        return self.store.owner_of(some_id) if len(some_id) == 24 else None

    def record(self, key_id: str, bulk_id: str) -> BulkRecord:
        """The key's bulk.

        :raises UnknownBulkError: there is none, or it is another key's.
        """
        rec = self.store.get(bulk_id) if len(bulk_id) == 24 else None
        if rec is None or rec.owner != key_id:
            raise UnknownBulkError(f"no bulk {bulk_id!r}")
        return rec

    def status(self, key_id: str, bulk_id: str) -> BulkStatus:
        """Where the key's bulk stands: counts, and for held items their place and ETA.

        :raises UnknownBulkError: there is no such bulk of this key.
        """
        rec = self.record(key_id, bulk_id)
        if rec.held == 0:
            return BulkStatus(rec, 0, None, None)
        ahead = self.store.held_bulks(rec.owner)
        earlier = ahead[:ahead.index(bulk_id)] if bulk_id in ahead else []
        position = sum(r.held for r in self.store.get_many(earlier) if r is not None)
        now_ms = self._now_ms()
        starts = self.store.starts(rec.owner)
        not_before = self.store.not_before_ms(rec.owner)
        return BulkStatus(rec, position, eta_s(position, starts, now_ms, not_before),
                          eta_s(position + rec.held - 1, starts, now_ms, not_before))

    def positions(self, key_id: str, bulk_id: str) -> dict[str, int]:
        """Each held item's job id and its place in its key's queue (0 = starts next).

        :raises UnknownBulkError: there is no such bulk of this key.
        """
        status = self.status(key_id, bulk_id)
        rec = status.record
        if rec.held == 0:
            return {}
        skipped = self.store.skipped(bulk_id)
        out: dict[str, int] = {}
        for index in range(rec.cursor, rec.total):
            if index not in skipped:
                out[item_job_id(bulk_id, index)] = status.position + len(out)
        return out

    def cancel(self, key_id: str, bulk_id: str) -> BulkRecord:
        """Cancel the key's bulk: held items never start, running ones stop.

        Finished items keep their results.  Cancelling an ended bulk changes nothing.

        :return: the bulk as it is now (``cancelling`` while items still run).
        :raises UnknownBulkError: there is no such bulk of this key.
        """
        rec = self.record(key_id, bulk_id)
        self.stop(rec, "cancelling")
        self.redis.publish(keys.BULK_WAKE, "")
        return self.record(key_id, bulk_id)

    def stop(self, rec: BulkRecord, status: str) -> None:
        """Stop a bulk: ``cancelling`` also cancels its running items, ``expiring`` lets them end.

        Held items end as cancelled (or expired); an announced bulk's held items
        get a final ``error`` event each.
        """
        code, first, total = self.store.stop(rec.bulk_id, rec.owner, status)
        if code == 0:
            return
        if status == "cancelling":
            for job_id in self.store.running_of(rec.bulk_id):
                self.jobs.request_cancel(job_id)
        if rec.announce:
            error = ("cancelled", "the bulk was cancelled before this item started") \
                if status == "cancelling" else \
                ("expired", "this item waited longer than the bulk's window and expired")
            if rec.kind == "interactive" and status == "expiring":
                wait_s = (rec.expires_ms - rec.created_ms) / 1000
                error = ("rate_limited", f"held {wait_s:g}s, the most this key's tier waits "
                         "for its limits (queue_max_wait_s), and they still refuse it; "
                         "retry later")
            skipped = self.store.skipped(rec.bulk_id)
            for index in range(first, total):
                if index not in skipped:
                    self.tell_item(item_job_id(rec.bulk_id, index), *error)

    def cancel_item(self, key_id: str, job_id: str, *, held_only: bool = False) -> bool:
        """Cancel one item of the key's bulks, held or running.

        :param held_only: leave an item that has started alone.
        :return: whether there was something to cancel (False: it has ended, or it
            has started and ``held_only`` is set).
        :raises UnknownBulkError: the job is not an item of one of this key's bulks.
        """
        bulk_id, index = split_job_id(job_id)
        rec = self.record(key_id, bulk_id)
        if index == LOG_INDEX:
            raise UnknownBulkError(f"no item {job_id!r}")
        code = self.store.cancel_item(bulk_id, key_id, index)
        if code == 0:
            return False if held_only else self.jobs.request_cancel(job_id)
        if code > 0 and rec.announce:
            self.tell_item(job_id, "cancelled", "the item was cancelled before it started")
        if code == 2:
            self.redis.publish(keys.BULK_WAKE, "")
        return code > 0

    def announce(self, key_id: str, bulk_id: str) -> None:
        """Write a ``held`` event to an announced bulk's log now, if it holds items.

        The pump writes them as they change, at most once a second; a front end
        calls this right after a submission so its client hears at once.

        :raises UnknownBulkError: there is no such bulk of this key.
        """
        status = self.status(key_id, bulk_id)
        rec = status.record
        if rec.announce and rec.held:
            self.events.append(log_id(bulk_id), "held", {
                "bulk_id": bulk_id, "held": rec.held, "next_index": rec.cursor,
                "position": status.position, "next_eta_s": status.next_eta_s,
                "last_eta_s": status.last_eta_s})

    def tell_item(self, job_id: str, code: str, message: str) -> None:
        """End the log of an item that never ran with an ``error`` event."""
        self.events.append(job_id, "error", {"code": code, "message": message},
                           status="cancelled" if code == "cancelled" else "error")

    def outcomes(self, bulk_id: str, start: int, count: int
                 ) -> list[tuple[int, Any, Outcome | None]]:
        """Items ``start`` … ``start + count - 1``: index, ref, and outcome if one was kept."""
        rec = self.store.get(bulk_id)
        if rec is None:
            return []
        indexes = list(range(start, min(rec.total, start + count)))
        refs = self.store.refs(bulk_id, indexes)
        results = self.store.results(bulk_id, indexes)
        return [(i, ref, Outcome.from_json(raw) if raw is not None else None)
                for i, ref, raw in zip(indexes, refs, results, strict=True)]

    def _now_ms(self) -> int:
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    @staticmethod
    def now_s() -> int:
        """The time in whole seconds, as the Batch API's timestamps count it."""
        return int(time.time())
