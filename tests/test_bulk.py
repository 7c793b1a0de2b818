"""The bulk engine and its pump, against the session's real workers: holds, order, limits, logs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from app.apikeys import KeyInfo, KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tasks.admission import Admission, AdmissionRejectedError
from tasks.bulk import BulkEngine, Held, ItemError
from tasks.config import Settings
from tasks.events import EventLog
from tasks.jobs import JobSpec, JobStore
from tests.conftest import MOCK, Proc, wait_for


@pytest.fixture(scope="module")
def settings(sluice_env: dict[str, str]) -> Settings:
    return Settings.from_env(sluice_env)


@pytest.fixture(scope="module")
def engine(settings: Settings, worker: Proc) -> Iterator[BulkEngine]:
    """A front end's bulk engine, in the test process, on the session's Redis and workers."""
    client = settings.redis_client()
    yield BulkEngine(client, settings, Admission.from_settings(settings, client),
                     JobStore(client, settings.job_ttl_s), EventLog(client, settings.event_ttl_s))
    client.close()


def new_key(r: redis.Redis, tier: str) -> KeyInfo:
    return KeyStore(r).create("bulk-test", tier)[1]


def held(prompt: str, max_tokens: int = 4, **kw: Any) -> Held:
    return Held(JobSpec(model="mock-1", messages=[{"role": "user", "content": prompt}],
                        max_tokens=max_tokens, **kw), ref=prompt)


def frames(engine: BulkEngine, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f) for _, f in engine.events.read(job_id)]


def ended(engine: BulkEngine, job_id: str) -> dict[str, Any] | None:
    log = frames(engine, job_id)
    return log[-1] if log and log[-1]["type"] in ("done", "error", "bulk_done") else None


def text(log: list[dict[str, Any]]) -> str:
    out = ""
    for f in log:
        out = "" if f["type"] == "restart" else out + f.get("text", "")
    return out


def test_bulk_items_run_as_jobs_and_the_bulk_log_ends_with_the_counts(
        engine: BulkEngine, r: redis.Redis) -> None:
    """20 items become 20 gap-free job logs with the mock's text; the bulk's log ends with bulk_done."""
    key = new_key(r, "unlimited")
    items = [held(f"bulk item {i}") for i in range(20)]
    items.insert(7, held("in a session", session="s1"))
    sub = engine.submit(key, items)
    assert isinstance(sub.jobs[7], ItemError) and sub.jobs[7].code == "bad_field"
    job_ids = [j for j in sub.jobs if isinstance(j, str)]
    assert len(job_ids) == 20
    done = wait_for(lambda: ended(engine, sub.log_id), 30, "bulk_done")
    assert done["type"] == "bulk_done"
    assert (done["total"], done["done"], done["failed"], done["status"]) == (20, 20, 0, "completed")
    config = MockConfig(**MOCK)
    for i, job_id in enumerate(job_ids):
        log = frames(engine, job_id)
        assert [f["seq"] for f in log] == list(range(len(log)))
        assert log[-1]["type"] == "done"
        messages = [{"role": "user", "content": f"bulk item {i}"}]
        assert text(log) == expected_text(messages, 4, config)
    assert engine.owner_of(job_ids[0]) == key.key_id
    assert r.hget(keys.BULK_PENDING, key.key_id) is None


def drain(admission: Admission, key: KeyInfo, leave: int) -> None:
    """Use up the key's token bucket but ``leave`` tokens, as if a big job had just run."""
    tier = admission.tier_of(key)
    need = tier.tokens_per_minute - leave
    admission.budget.reserve(key.key_id, "drain" + key.key_id, need, tier.rates,
                             prompt_tokens=need, slot_ttl_ms=60_000, reservation_ttl_s=60)
    admission.budget.settle("drain" + key.key_id, need, 0)


def test_a_bulk_beyond_the_limits_is_held_and_runs_within_them(
        engine: BulkEngine, r: redis.Redis) -> None:
    """200 items on 5 slots and an empty bucket: all done, never > 5 at once, never over budget, positions count down."""
    key = new_key(r, "bulk5")  # 5 jobs at once, 20,000 tokens/min (333/s), all for batches
    drain(engine.admission, key, leave=0)  # each item needs ~12 tokens: ~28 items/s at most
    t0 = time.monotonic()
    sub = engine.submit(key, [held(f"x{i}", max_tokens=4) for i in range(200)])
    most_at_once, lowest, charged, positions = 0, 0, 0, []
    while not ended(engine, sub.log_id):
        most_at_once = max(most_at_once, r.zcard(keys.slots(key.key_id)))
        limits = engine.admission.limits(key)
        lowest = min(lowest, limits.remaining_tokens)
        used = engine.admission.usage(key.key_id, 1)[0]
        charged = used.prompt_tokens + used.completion_tokens - 20_000
        assert charged <= 20_000 / 60 * (time.monotonic() - t0) + 12, "over budget"
        mid = engine.positions(key.key_id, sub.bulk_id)
        if mid:
            assert sorted(mid.values()) == list(range(len(mid)))
            positions.append(mid.get(sub.jobs[-1]))  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 40, "the bulk did not finish"
        time.sleep(0.05)
    done = ended(engine, sub.log_id)
    assert done is not None and (done["done"], done["failed"]) == (200, 0)
    assert most_at_once <= 5 and lowest >= 0
    # Whether the pump ever met an empty bucket depends on how fast this box
    # starts items (under a loaded suite it may not): the budget bound above
    # is what must hold either way.
    counted = [p for p in positions if p is not None]
    assert len(set(counted)) > 5 and counted == sorted(counted, reverse=True)
    held_events = [f for f in frames(engine, sub.log_id) if f["type"] == "held"]
    last = [e["position"] + 199 - e["next_index"] for e in held_events]
    assert len(last) > 2 and last == sorted(last, reverse=True)
    assert any(e["next_eta_s"] is not None for e in held_events)


def test_batch_items_leave_the_interactive_share_of_a_key(
        engine: BulkEngine, r: redis.Redis) -> None:
    """With batch_share 0.5 a batch item is held when the bucket is at half, an interactive request is not."""
    key = new_key(r, "halves")  # 100,000 tokens/min, 4 jobs at once, half for batches
    drain(engine.admission, key, leave=48_000)  # 2,000 below half; it refills 1,667/s
    spec = JobSpec(model="mock-1", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    with pytest.raises(AdmissionRejectedError) as e:
        engine.admission.admit(key, spec, batch=True)
    assert e.value.code == "rate_limited" and 0 < e.value.retry_after < 2  # type: ignore[operator]
    admitted = engine.admission.admit(key, spec)
    engine.admission.settle(admitted.job_id, 0, 0)
    assert engine.admission.tier_of(key).batch_slots == 2


def test_a_bulk_runs_no_more_items_at_once_than_its_share_of_slots(
        engine: BulkEngine, r: redis.Redis) -> None:
    """A 'halves' key (4 slots, half for batches) runs at most 2 bulk items at once; 2 slots stay free."""
    key = new_key(r, "halves")
    sub = engine.submit(key, [held(f"share {i}", max_tokens=12) for i in range(12)])
    most = 0
    while not ended(engine, sub.log_id):
        most = max(most, r.zcard(keys.slots(key.key_id)))
        time.sleep(0.02)
    assert ended(engine, sub.log_id)["done"] == 12  # type: ignore[index]
    assert most == 2


def test_cancelling_a_bulk_ends_its_held_items_in_their_logs_and_leaks_nothing(
        engine: BulkEngine, r: redis.Redis) -> None:
    """Cancel a held bulk: every item's log ends 'cancelled', bulk_done says so, no hold or pending remains."""
    key = new_key(r, "tiny")  # 600 tokens/min, half for batches: nothing starts for ~30 s
    drain(engine.admission, key, leave=0)
    sub = engine.submit(key, [held(f"c{i}") for i in range(6)])
    first = sub.jobs[0]
    assert isinstance(first, str) and engine.cancel_item(key.key_id, first)
    assert engine.positions(key.key_id, sub.bulk_id) == {
        j: i for i, j in enumerate(sub.jobs[1:])}
    rec = engine.cancel(key.key_id, sub.bulk_id)
    assert rec.status == "cancelled" and rec.cancelled == 6
    done = wait_for(lambda: ended(engine, sub.log_id), 10, "bulk_done")
    assert (done["status"], done["cancelled"], done["done"]) == ("cancelled", 6, 0)
    for job_id in sub.jobs:
        assert ended(engine, job_id)["code"] == "cancelled"  # type: ignore[arg-type,index]
    assert r.hget(keys.BULK_PENDING, key.key_id) is None and not r.exists(keys.hold(key.key_id))
    assert r.zcard(keys.slots(key.key_id)) == 0
    with pytest.raises(LookupError):
        engine.cancel(new_key(r, "tiny").key_id, sub.bulk_id)  # another key's: unknown


def test_held_items_expire_after_the_wait_allowed(settings: Settings, engine: BulkEngine,
                                                   r: redis.Redis) -> None:
    """Items still held when the bulk's wait runs out end 'expired'; bulk_done says expired."""
    key = new_key(r, "tiny")  # nothing starts for ~30 s
    drain(engine.admission, key, leave=0)
    short = BulkEngine(engine.redis, replace(settings, bulk_max_wait_s=1), engine.admission,
                       engine.jobs, engine.events)
    sub = short.submit(key, [held(f"e{i}") for i in range(3)])
    done = wait_for(lambda: ended(engine, sub.log_id), 15, "bulk_done")
    assert (done["status"], done["cancelled"]) == ("expired", 3)
    assert ended(engine, sub.jobs[2])["code"] == "expired"  # type: ignore[arg-type,index]
    assert r.hget(keys.BULK_PENDING, key.key_id) is None
