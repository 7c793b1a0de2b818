"""The pump: starts held bulk items as their keys' limits allow, and counts their ends.

One worker process pumps at a time (see :mod:`workers.pump`).  Each round it

1. counts the items whose jobs ended (their outcome, kept for batches), and
   tells the bulks that ended (``bulk_done`` in an announced bulk's log);
2. starts held items, one per key in turn, in each key's submission order,
   while the gateway has fewer than ``bulk_max_running`` items running and
   the key fewer than its tier's ``batch_slots``.  Each item is admitted
   like any request (:meth:`tasks.admission.Admission.admit`, with
   ``batch=True``): a key whose buckets or slots refuse it waits until the
   refusal's ``retry_after`` (or until one of its items ends) and the pump
   goes on with the other keys;
3. once a second, writes ``held`` events for announced bulks whose place changed.

A started item is an ordinary job on the bulk queue.  Because the gateway
never has more than ``bulk_max_running`` bulk items started, the bulk queue
never holds more than the workers start at once, and an interactive job is
never behind a wall of bulk messages.

Crash safety: an item is claimed (one Lua call) before its job is created,
its reservation is keyed by its job id (admitting it again reserves
nothing more), and a claimed item whose job never appeared is started again
by the next sweep; an item whose job lost its message is sent again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

import redis

from tasks.admission import Admission, AdmissionRejectedError, Admitted
from tasks.bulk import BulkEngine, eta_s
from tasks.bulk_store import BulkRecord, item_job_id, log_id, spec_of, split_job_id
from tasks.config import Settings
from tasks.jobs import FINAL, JobSpec
from tasks.outcome import Outcome
from tasks.queue import Dispatcher

log = logging.getLogger(__name__)

#: How often every running item's job is looked at, whatever the wake-ups say.
SWEEP_S = 1.0
#: How often announced bulks' ``held`` events are brought up to date.
ANNOUNCE_S = 1.0
#: How long a key whose slots are full waits, unless one of its items ends first.
SLOT_WAIT_MS = 1000
#: How long the pump waits at most between rounds.
IDLE_S = 1.0
#: Items started per round at most, so that ends are counted in between (and
#: a new bulk's items reach the workers as a stream, not a wall).
STARTS_PER_ROUND = 8

Started = Literal["started", "progress", "wait", "full"]


@dataclass(frozen=True)
class Holder:
    """The key a bulk's items act for, as admission needs it."""

    key_id: str
    tier: str


class Pump:
    """Starts held items and counts their ends; call :meth:`step` in a loop.

    Example::

        pump = Pump(settings, engine, dispatcher)
        while holding_the_lock:
            wait_s = pump.step(ended_job_ids)
    """

    def __init__(self, settings: Settings, engine: BulkEngine, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.engine = engine
        self.store = engine.store
        self.admission: Admission = engine.admission
        self.jobs = engine.jobs
        self.events = engine.events
        self.dispatcher = dispatcher
        #: A claimed item whose job is missing this long was lost by a pump that died.
        self.claim_grace_ms = max(5000, 3000 * settings.lease_ttl_s)
        #: A started item whose job is still queued this long is sent again.
        self.resend_ms = max(5000, 3000 * settings.lease_ttl_s)
        self._swept = 0.0
        self._announced_at = 0.0
        self._announced: dict[str, tuple[int, int, int]] = {}
        self._resent: dict[str, float] = {}
        self._meta_cache: dict[str, BulkRecord] = {}
        self._heads: dict[str, str] = {}
        #: Starts are paced at ``bulk_starts_per_s`` (two in a row at most after a quiet
        #: spell), so a wave of ends does not become a wave of starts.
        self._interval = 1 / max(settings.bulk_starts_per_s, 0.001)
        self._next_start = 0.0

    def step(self, ended: Iterable[str] = ()) -> float:
        """One round: count ends, announce ended bulks, start what fits.

        :param ended: job ids whose task just finished (the others are swept each second).
        :return: seconds until the next round is due, unless woken before.
        """
        now = time.monotonic()
        if now - self._swept >= SWEEP_S:
            self._swept = now
            self.sweep()
        else:
            running = self.store.running()
            for job_id in set(ended) & running.keys():
                status = self.jobs.status(job_id)
                if status in FINAL:
                    self.count_end(job_id, status)
        self.announce_finished()
        wait = self.start_held()
        if now - self._announced_at >= ANNOUNCE_S:
            self._announced_at = now
            self.announce_held()
        return wait

    # -- ends ---------------------------------------------------------------
    def sweep(self) -> None:
        """Look at every running item: count the ended, restart the lost, resend the stuck."""
        now_ms = self._now_ms()
        running = self.store.running()
        for job_id, claimed_ms in running.items():
            status = self.jobs.status(job_id)
            if status in FINAL:
                self.count_end(job_id, status)
            elif status is None and now_ms - claimed_ms > self.claim_grace_ms:
                self._recover(job_id)
            elif status == "queued" and now_ms - claimed_ms > self.resend_ms:
                if time.monotonic() - self._resent.get(job_id, 0) > self.resend_ms / 1000:
                    # A message lost with its worker (taken, not yet leased): a copy
                    # of a job that runs or ran does nothing.
                    log.warning("bulk item %s still queued; sending it again", job_id)
                    self._resent[job_id] = time.monotonic()
                    self.dispatcher.send(job_id, self.jobs.queue_of(job_id)
                                         or self.settings.bulk_queue)
        for job_id in list(self._resent):
            if job_id not in running:
                del self._resent[job_id]

    def count_end(self, job_id: str, status: str | None) -> None:
        """Count an ended item's outcome in its bulk (once, however often called)."""
        job = self.jobs.get(job_id)
        outcome = Outcome.of_log(self.events.read(job_id), job)
        owner = job.spec.owner if job else self.store.owner_of(split_job_id(job_id)[0])
        if owner is None:
            return
        self.store.end(job_id, owner, outcome.status, outcome.to_json(),
                       outcome.prompt_tokens, outcome.completion_tokens)

    def _recover(self, job_id: str) -> None:
        """Start an item whose pump died between claiming it and creating its job."""
        bulk_id, index = split_job_id(job_id)
        raw = self.store.spec(bulk_id, index)
        rec = self.store.get(bulk_id)
        if raw is None or rec is None:
            # Its spec is gone, so its job was created; the record is gone too: it
            # ran and expired before anyone read it (or never ran at all).
            log.warning("bulk item %s: its job vanished; counting it as failed", job_id)
            owner = rec.owner if rec else self.store.owner_of(bulk_id)
            if owner:
                self.store.end(job_id, owner, "failed", Outcome.error(
                    "failed", "lost", "the item's job expired before its outcome was read"
                ).to_json(), 0, 0)
            return
        log.warning("bulk item %s was claimed but never started; starting it", job_id)
        spec, given = spec_of(raw)
        try:
            admitted = self.admission.admit(Holder(rec.owner, rec.tier), spec,
                                            max_tokens_given=given, job_id=job_id)
        except AdmissionRejectedError as e:
            self._fail(rec, index, e.code, e.message, claimed=True)
            return
        self._launch(rec, index, admitted)

    def announce_finished(self) -> None:
        """Write ``bulk_done`` to the logs of announced bulks that ended."""
        for bulk_id in self.store.finished():
            rec = self.store.get(bulk_id)
            if rec is not None and rec.announce and self.jobs.status(log_id(bulk_id)) != "done":
                self.events.append(log_id(bulk_id), "bulk_done", {
                    "bulk_id": bulk_id, "status": rec.status, "total": rec.total,
                    "done": rec.done, "failed": rec.failed, "cancelled": rec.cancelled},
                    status="done")
            self.store.forget_finished(bulk_id)
            self._announced.pop(bulk_id, None)
            self._meta_cache.pop(bulk_id, None)

    # -- starts -------------------------------------------------------------
    def start_held(self) -> float:
        """Start up to ``STARTS_PER_ROUND`` held items, a key at a time in turn, as caps allow.

        :return: seconds until the next round is due: 0 when more could start now,
            else until a waiting key may be tried again (at most ``IDLE_S``).
        """
        pace = time.monotonic() - self._next_start
        if pace < 0:
            return -pace
        now_ms = self._now_ms()
        running = self.store.running_count()
        ready = self.store.ready_keys(now_ms)
        started = 0
        while ready:
            again = []
            for key_id in ready:
                if running >= self.settings.bulk_max_running:
                    return IDLE_S
                wait = self._next_start - time.monotonic()
                if started >= STARTS_PER_ROUND or wait > 0:
                    return max(0.0, wait)  # count the ends that came meanwhile, then go on
                outcome = self._start_one(key_id, now_ms)
                if outcome == "full":
                    return IDLE_S
                if outcome == "started":
                    running += 1
                    started += 1
                    now = time.monotonic()
                    self._next_start = max(self._next_start, now - self._interval) \
                        + self._interval
                if outcome != "wait":
                    again.append(key_id)
            ready = again
        nxt = self.store.next_ready_ms()
        if nxt is None:
            return IDLE_S
        return min(IDLE_S, max(0.005, (nxt - now_ms) / 1000))

    def _start_one(self, key_id: str, now_ms: int) -> Started:
        """Start the key's next held item, or say why not."""
        # A key's first bulk changes only when it is exhausted or stopped (later
        # bulks queue behind it), so it is looked up once.
        head = self._heads.get(key_id)
        if head is None:
            bulks = self.store.held_bulks(key_id, 1)
            if not bulks:
                self.store.forget_key(key_id)
                return "wait"
            head = self._heads[key_id] = bulks[0]
        rec = self._meta(head)
        if rec is None or rec.status != "active":
            self._heads.pop(key_id, None)
            self.store.next_item(head, key_id)  # takes it off the key's queue
            return "progress"
        if now_ms > rec.expires_ms:
            self.engine.stop(rec, "expiring")
            self._heads.pop(key_id, None)
            return "progress"
        tier = self.admission.tiers.get(rec.tier)
        # A held interactive request (queue_instead_of_429) runs as one: its key's
        # whole buckets and slots, the interactive queue.
        interactive = rec.kind == "interactive"
        key_cap = (tier.max_concurrent_jobs if interactive else tier.batch_slots) if tier else 1
        nxt = self.store.next_item(rec.bulk_id, key_id, key_cap)
        if nxt is None:
            self._meta_cache.pop(rec.bulk_id, None)
            self._heads.pop(key_id, None)
            return "progress"
        index, raw = nxt
        if index < 0:
            return self._defer(rec, now_ms, SLOT_WAIT_MS)
        job_id = item_job_id(rec.bulk_id, index)
        if raw is None:
            self._fail(rec, index, "lost", "the item's request was lost")
            return "progress"
        spec, given = spec_of(raw)
        try:
            admitted = self.admission.admit(Holder(key_id, rec.tier), spec,
                                            max_tokens_given=given, job_id=job_id,
                                            batch=not interactive)
        except AdmissionRejectedError as e:
            # Whatever a crashed round may have reserved for this item goes back.
            self._refund(job_id)
            if e.code in ("rate_limited", "concurrency_limit") or isinstance(
                    e.__cause__, redis.RedisError):
                return self._defer(rec, now_ms, math.ceil(e.retry_after * 1000)
                                   if e.retry_after else SLOT_WAIT_MS)
            self._fail(rec, index, e.code, e.message)
            return "progress"
        code = self.store.claim(rec.bulk_id, key_id, index,
                                cap=self.settings.bulk_max_running, key_cap=key_cap)
        if code == 1:
            self._launch(rec, index, admitted)
            return "started"
        if code != -1:  # -1: another pump claimed it, and the reservation is its job's
            self._refund(job_id)
        if code == 0:
            return "full"
        if code == 3:
            return self._defer(rec, now_ms, SLOT_WAIT_MS)
        return "progress"

    def _defer(self, rec: BulkRecord, now_ms: int, wait_ms: int) -> Started:
        """Try the bulk's key again after ``wait_ms``, or when the bulk's wait runs out."""
        self.store.defer(rec.owner, min(now_ms + wait_ms, rec.expires_ms + 1))
        return "wait"

    def _meta(self, bulk_id: str) -> BulkRecord | None:
        """A bulk's record as it was when first seen (only its unchanging fields are used)."""
        rec = self._meta_cache.get(bulk_id)
        if rec is None or rec.status != "active":
            rec = self.store.get(bulk_id)
            if rec is not None:
                self._meta_cache[bulk_id] = rec
        return rec

    def _launch(self, rec: BulkRecord, index: int, admitted: Admitted) -> None:
        """Create and enqueue a claimed item's job on the bulk queue."""
        job_id = item_job_id(rec.bulk_id, index)
        queue = self.settings.queue if rec.kind == "interactive" else self.settings.bulk_queue
        spec: JobSpec = replace(admitted.spec, queue=queue)
        self.jobs.create(spec, job_id)
        self.dispatcher.enqueue(job_id, queue)
        if self.store.drop_spec(rec.bulk_id, index) != "active":
            self.jobs.request_cancel(job_id)  # the bulk was cancelled after the claim

    def _fail(self, rec: BulkRecord, index: int, code: str, message: str, *,
              claimed: bool = False) -> None:
        """End an item that cannot run (refused for good) without starting it."""
        job_id = item_job_id(rec.bulk_id, index)
        if not claimed and self.store.claim(rec.bulk_id, rec.owner, index, cap=None) != 1:
            return
        self.store.drop_spec(rec.bulk_id, index)
        if rec.announce:
            self.engine.tell_item(job_id, code, message)
        self.store.end(job_id, rec.owner, "failed",
                       Outcome.error("failed", code, message).to_json(), 0, 0)

    def _refund(self, job_id: str) -> None:
        """Give back an unstarted item's reservation, if it holds one."""
        self.dispatcher.refund(job_id)

    # -- held events ---------------------------------------------------------
    def announce_held(self) -> None:
        """Write a ``held`` event to each announced bulk whose held figures changed."""
        now_ms = self._now_ms()
        for key_id in self.store.all_held_keys():
            bulk_ids = self.store.held_bulks(key_id)
            recs = [r for r in self.store.get_many(bulk_ids) if r is not None]
            if not any(r.announce for r in recs):
                continue
            starts = self.store.starts(key_id)
            not_before = self.store.not_before_ms(key_id)
            position = 0
            for rec in recs:
                figures = (rec.held, rec.cursor, position)
                if rec.announce and rec.held and self._announced.get(rec.bulk_id) != figures:
                    self._announced[rec.bulk_id] = figures
                    self.events.append(log_id(rec.bulk_id), "held", {
                        "bulk_id": rec.bulk_id, "held": rec.held, "next_index": rec.cursor,
                        "position": position,
                        "next_eta_s": eta_s(position, starts, now_ms, not_before),
                        "last_eta_s": eta_s(position + rec.held - 1, starts, now_ms,
                                            not_before)})
                position += rec.held

    def _now_ms(self) -> int:
        seconds, micros = self.store.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000
