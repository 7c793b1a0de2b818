"""A socket's bulks: its ``bulk`` frames, its held ``generate`` requests, their cancels.

The socket's :class:`~app.ws.Connection` meters, parses and answers every
frame; what is particular to bulks is here: submitting one to the bulk engine
(:mod:`tasks.bulk`), answering it with one ``queued`` frame, following its
items and its own log (``held`` events, then ``bulk_done``), cancelling by
bulk id, and dropping a held ``generate`` whose client went away.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import redis

from app import metrics
from app.apikeys import KeyInfo
from app.protocol import Bulk, Generate, ProtocolError
from app.writer import SocketWriter
from tasks.admission import AdmissionRejectedError
from tasks.bulk import BulkEngine, BulkRejectedError, Held, ItemError, UnknownBulkError
from tasks.bulk_store import LOG_INDEX, split_job_id

log = logging.getLogger(__name__)


class SocketBulks:
    """Serves one socket's bulk requests through the bulk engine; its writer follows them.

    Example::

        bulks = SocketBulks(engine, writer, max_follows=100)
        bulks.check(req)                # before the frame is charged: raises ProtocolError
        bulks.submit(key, req)          # one 'queued' frame; the items' events follow
        bulks.closed(key_id, unfinished, cancel=False)
    """

    def __init__(self, engine: BulkEngine, writer: SocketWriter, *, max_follows: int) -> None:
        self.engine = engine
        self.writer = writer
        self.max_follows = max_follows
        #: Bulks this socket submitted (cancelled with its jobs when it must cancel them).
        self.bulks: set[str] = set()
        #: Job ids of ``generate`` requests held instead of refused (``queue_instead_of_429``):
        #: nobody waits for them once the socket is gone, so they are dropped then.
        self.held: set[str] = set()

    def check(self, req: Bulk) -> None:
        """Refuse a bulk frame that cannot be served, before anything is charged or held.

        :raises ProtocolError: ``bad_field`` (no valid item; the frame lists why, per
            item) or ``follow_limit`` (the socket cannot follow its items and its log).
        """
        valid = sum(isinstance(item, Generate) for item in req.items)
        if not valid:
            raise ProtocolError("bad_field", f"none of the {len(req.items)} items is valid; "
                                "see 'items'", extra={"items": [
                                    _item_error(e.ref, e.code, e.message) for e in req.items
                                    if isinstance(e, ProtocolError)]})
        following = len(self.writer.following)
        if following + valid + 1 > self.max_follows:
            raise ProtocolError("follow_limit", f"this socket follows {following} jobs of at "
                                f"most {self.max_follows}; a bulk of {valid} valid items "
                                f"needs {valid + 1} more (its items and its log); send fewer "
                                "items, or open another socket")

    def submit(self, key: KeyInfo, req: Bulk) -> None:
        """Hold a checked bulk's valid items; answer one ``queued`` frame; follow it all.

        :raises ProtocolError: ``too_many_items`` or ``too_many_pending`` (nothing held).
        """
        valid = [item for item in req.items if isinstance(item, Generate)]
        try:
            sub = self.engine.submit(key, [Held(g.spec, g.max_tokens_given, g.ref)
                                           for g in valid])
        except BulkRejectedError as e:
            raise ProtocolError(e.code, e.message) from e
        self.bulks.add(sub.bulk_id)
        outcomes = iter(sub.jobs)
        items: list[dict[str, Any]] = []
        job_ids: list[str] = []
        for item in req.items:
            if isinstance(item, ProtocolError):
                items.append(_item_error(item.ref, item.code, item.message))
                continue
            got = next(outcomes)
            if isinstance(got, ItemError):
                items.append(_item_error(item.ref, got.code, got.message))
            else:
                items.append({"ref": item.ref, "job_id": got})
                job_ids.append(got)
        metrics.JOBS_SUBMITTED.inc(len(job_ids))
        metrics.REQUESTS_REJECTED.labels("bad_item").inc(len(items) - len(job_ids))
        self.writer.send(json.dumps({"type": "queued", "ref": req.ref, "bulk_id": sub.bulk_id,
                                     "log_id": sub.log_id, "held": len(job_ids),
                                     "items": items}))
        # Followed from seq 0 like any job: an item's events come when it starts.
        self.writer.follow(sub.log_id, 0)
        for job_id in job_ids:
            self.writer.follow(job_id, 0)

    def hold(self, key: KeyInfo, req: Generate, refusal: AdmissionRejectedError,
             accepted: float) -> None:
        """Hold a ``generate`` the key's buckets refuse now (its tier's ``queue_instead_of_429``).

        It becomes a one-item bulk that the pump starts as an interactive job once
        the buckets allow; held longer than the tier's ``queue_max_wait_s``, it ends
        with ``rate_limited``.  It takes two follows: its job and its hold's log.

        :param accepted: when the frame arrived (monotonic), for the client's TTFT.
        :raises AdmissionRejectedError: ``refusal``, when it cannot be held.
        """
        if len(self.writer.following) + 2 > self.max_follows:
            raise refusal
        tier = self.engine.admission.tier_of(key)
        try:
            sub = self.engine.submit(key, [Held(req.spec, req.max_tokens_given, req.ref)],
                                     kind="interactive", max_items=1,
                                     wait_s=tier.queue_max_wait_s)
        except BulkRejectedError:
            raise refusal from None  # the key holds too much already: refuse as usual
        job_id = sub.jobs[0]
        if isinstance(job_id, ItemError):
            raise ProtocolError(job_id.code, job_id.message)
        self.held.add(job_id)
        metrics.JOBS_SUBMITTED.inc()
        queued: dict[str, Any] = {"type": "queued", "ref": req.ref, "job_id": job_id,
                                  "position": 0, "held": True, "bulk_id": sub.bulk_id,
                                  "log_id": sub.log_id, "max_wait_s": tier.queue_max_wait_s}
        if refusal.limits is not None:
            queued["limits"] = refusal.limits.as_dict()
        self.writer.send(json.dumps(queued))
        # Its first ``held`` event now: the pump's come at most once a second.
        self.engine.announce(key.key_id, sub.bulk_id)
        self.writer.follow(sub.log_id, 0)
        self.writer.follow(job_id, 0, accepted_at=accepted)

    def cancel_bulk(self, key_id: str, bulk_id: str) -> None:
        """Cancel the key's bulk: held items end ``cancelled`` now, running ones are cancelled.

        :raises ProtocolError: ``unknown_job``, no such bulk of this key.
        """
        try:
            self.engine.cancel(key_id, bulk_id)
        except UnknownBulkError:
            raise ProtocolError("unknown_job", f"no bulk {bulk_id!r}: it never existed, it "
                                "has expired, or it belongs to another key") from None

    def cancel_job(self, key_id: str, job_id: str, owner: str | None) -> bool:
        """Cancel what a job id names when it is a bulk's: its log (the bulk) or a held item.

        :param owner: the owner of the job's record (``None``: there is none).
        :return: whether it was one of the key's bulks' (else cancel it as a job).
        """
        bulk_id, index = split_job_id(job_id)
        if index == LOG_INDEX and self.engine.owner_of(bulk_id) == key_id:
            self.cancel_bulk(key_id, bulk_id)  # the bulk's log stands for the bulk
            return True
        if owner is None and self.engine.owner_of(job_id) == key_id:
            try:  # held: it never starts; started meanwhile: its job is cancelled
                self.engine.cancel_item(key_id, job_id)
                return True
            except UnknownBulkError:
                pass
        return False

    def closed(self, key_id: str, unfinished: list[str], *, cancel: bool) -> None:
        """The socket closed: drop its held ``generate``\\ s not yet started and, with
        ``cancel``, cancel its bulks.  Never raises."""
        for job_id in self.held.intersection(unfinished):
            try:
                self.engine.cancel_item(key_id, job_id, held_only=True)
            except (redis.RedisError, UnknownBulkError) as e:
                log.warning("could not drop held job %s of a closed socket: %s", job_id, e)
        if not cancel:
            return
        try:
            for bulk_id in self.bulks:
                with contextlib.suppress(UnknownBulkError):  # expired meanwhile
                    self.engine.cancel(key_id, bulk_id)
        except redis.RedisError as e:
            log.warning("could not cancel the bulks of a closed socket: %s", e)


def _item_error(ref: Any, code: str, message: str) -> dict[str, Any]:
    """A bulk item that became no job, as frames list it."""
    return {"ref": ref, "code": code, "message": message}
