"""The event log and job store against a real Redis: idempotent appends, fencing, sessions."""

from __future__ import annotations

import json

import pytest
import redis

from tasks.events import EventLog, LeaseLostError, LogMismatchError
from tasks.jobs import JobSpec, JobStore


def _job(store: JobStore, **kw: object) -> str:
    spec = JobSpec(model="mock-1", messages=[{"role": "user", "content": "hi"}],
                   max_tokens=4, **kw)  # type: ignore[arg-type]
    return store.create(spec)[0]


def test_retried_append_is_logged_once(store: JobStore, log: EventLog) -> None:
    """An append repeated with the same expected seq (a lost reply) does not log twice."""
    job_id = _job(store)
    assert log.append(job_id, "token", {"text": "a"}, expect_seq=0).seq == 0
    assert log.append(job_id, "token", {"text": "a"}, expect_seq=0).seq == 0
    assert log.append(job_id, "token", {"text": "b"}, expect_seq=1).seq == 1
    frames = [json.loads(f) for _, f in log.read(job_id)]
    assert [f["text"] for f in frames] == ["a", "b"]
    with pytest.raises(LogMismatchError):
        log.append(job_id, "token", {"text": "c"}, expect_seq=7)


def test_append_without_the_lease_is_refused(store: JobStore, log: EventLog) -> None:
    """Only the lease holder may write; a stale attempt is fenced off."""
    job_id = _job(store)
    assert store.start(job_id, "attempt-1", 10_000).outcome == "started"
    assert store.start(job_id, "attempt-2", 10_000).outcome == "held"
    log.append(job_id, "token", {"text": "x"}, lease_token="attempt-1")
    with pytest.raises(LeaseLostError):
        log.append(job_id, "token", {"text": "y"}, lease_token="attempt-2")


def test_ended_job_cannot_be_leased_again(store: JobStore, log: EventLog) -> None:
    """A redelivered copy arriving after the end does not start a second generation."""
    job_id = _job(store)
    assert store.start(job_id, "a", 10_000).outcome == "started"
    log.append(job_id, "done", {}, lease_token="a", status="done")
    store.release_lease(job_id, "a")
    assert store.start(job_id, "b", 10_000).outcome == "ended"


def test_sessions_are_per_key(store: JobStore) -> None:
    """Two keys using the same session name do not queue behind each other."""
    _job(store, session="chat", owner="alice")
    ahead_alice = store.create(JobSpec(model="mock-1", messages=[], max_tokens=1,
                                       session="chat", owner="alice"))[1]
    ahead_mallory = store.create(JobSpec(model="mock-1", messages=[], max_tokens=1,
                                         session="chat", owner="mallory"))[1]
    assert (ahead_alice, ahead_mallory) == (1, 0)


def test_session_skips_jobs_whose_record_expired(store: JobStore, r: redis.Redis) -> None:
    """Advancing a session passes over a job that no longer exists instead of stalling."""
    first = _job(store, session="s", owner="k")
    gone = _job(store, session="s", owner="k")
    third = _job(store, session="s", owner="k")
    r.delete(f"sluice:job:{gone}")
    assert store.advance_session("k", "s", first) == third
    assert store.advance_session("k", "s", first) is None  # idempotent
