"""A job's end in one call (tasks/events.py FINISH), against the real Redis and the real stack.

The call that logs a job's last event also ends its lease (a job without a
chat session), fills in the client TTFT the front end recorded, and ends the
provider request that streamed the answer — each exactly once, however often
the call is retried after a lost reply.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from app.cli.dev.redis_server import RedisServer
from tasks import events, jobs, keys, routing
from tasks.budget import Bill
from tasks.config import Settings
from tasks.deployments import parse_providers
from tasks.events import Ending, EventLog, LeaseLostError, new_slot
from tasks.generate import run_job
from tasks.jobs import JobSpec, JobStore
from tasks.routing import Outcome, Router
from tests.conftest import Client
from workers.celery_app import create_celery


@pytest.fixture
def router(redis_server: RedisServer) -> Router:
    tag = uuid.uuid4().hex[:8]
    doc = {"models": {"m": {"strategy": "least-busy"}},
           "deployments": {f"{tag}-a": {"base_url": "http://127.0.0.1:1/v1", "models": ["m"]}}}
    return Router(redis.Redis.from_url(redis_server.url), parse_providers(doc, Settings()), 600)


def _started(store: JobStore, token: str, session: str | None = None) -> str:
    job_id = store.create(JobSpec(model="m", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=4, owner="k", session=session))[0]
    assert store.start(job_id, token, 10_000).outcome == "started"
    return job_id


def _served(router: Router) -> tuple[int, int]:
    state = router.states()[0]
    return state.in_flight, state.served


def _done(log: EventLog, job_id: str, token: str, end: Ending, seq: int = 0,
          body: dict | None = None) -> int:
    return log.append(job_id, "done", body or {}, lease_token=token, status="done",
                      expect_seq=seq, bill=Bill("k", None, 1), end=end).seq


def test_finish_ends_lease_and_request_once_however_often_it_is_retried(
        store: JobStore, log: EventLog, router: Router, r: redis.Redis) -> None:
    """A job without a session: the done event drops its lease and running entry and ends the
    deployment request; the same call again (a lost reply) is a repeat, not a lost lease."""
    job_id = _started(store, "t1")
    pick = router.pick(router.providers.models["m"], job_id, 100)
    assert _served(router) == (1, 0)
    end = Ending(lease=True, route=router.release_call(pick, job_id, 100, Outcome(True, 40)))
    assert _done(log, job_id, "t1", end) == 0
    assert r.exists(keys.lease(job_id)) == 0
    assert r.zscore(keys.RUNNING, job_id) is None
    assert _served(router) == (0, 1)
    for _ in range(2):  # retried: the same reply, nothing done twice
        assert _done(log, job_id, "t1", end) == 0
    assert _served(router) == (0, 1)
    assert [seq for seq, _ in log.read(job_id)] == [0]
    # Another attempt's token is still refused, and a late release with once changes nothing.
    with pytest.raises(LeaseLostError):
        _done(log, job_id, "t2", end)
    router.release(pick, job_id, 100, Outcome(True, 40), once=True)
    assert _served(router) == (0, 1)


def test_a_session_job_keeps_its_lease_until_released(
        store: JobStore, log: EventLog, r: redis.Redis) -> None:
    """A chat session's job stays leased and running after its end, for the reaper's housekeeping."""
    job_id = _started(store, "t1", session="chat")
    assert _done(log, job_id, "t1", Ending(lease=False)) == 0
    assert r.get(keys.lease(job_id)) == b"t1"
    assert r.zscore(keys.RUNNING, job_id) is not None
    store.release_lease(job_id, "t1")
    assert r.exists(keys.lease(job_id)) == 0


def test_finish_without_the_lease_ends_no_request(
        store: JobStore, log: EventLog, router: Router) -> None:
    """A lost lease: nothing is logged and the deployment request stays counted (the caller ends it)."""
    job_id = _started(store, "t1")
    pick = router.pick(router.providers.models["m"], job_id, 100)
    end = Ending(lease=True, route=router.release_call(pick, job_id, 100, Outcome(True, 40)))
    with pytest.raises(LeaseLostError):
        _done(log, job_id, "someone-else", end)
    assert _served(router) == (1, 0)
    router.release(pick, job_id, 100, Outcome(True, 40), once=True)
    assert _served(router) == (0, 1)


@pytest.mark.parametrize(("stored", "shown"), [(None, "null"), ("123.456", "123.456"),
                                               ("12", "12.0"), ("1e+16", "10000000000000000"),
                                               ("junk", "null")])
def test_finish_fills_in_the_client_ttft(store: JobStore, log: EventLog, r: redis.Redis,
                                         stored: str | None, shown: str) -> None:
    """The client TTFT the front end recorded goes into the frame as a number, or null."""
    job_id = _started(store, "t1")
    if stored is not None:
        r.hset(keys.job(job_id), "client_ttft_ms", stored)
    slot, other = new_slot(), new_slot()
    body = {"finish_reason": other, "metrics": {"a": 1, "client_ttft_ms": slot, "b": "x"}}
    _done(log, job_id, "t1", Ending(lease=True, client_ttft_slot=slot), body=body)
    [(_, frame)] = log.read(job_id)
    assert f'"client_ttft_ms":{shown},"b":"x"' in frame
    metrics = json.loads(frame)["metrics"]
    assert metrics["client_ttft_ms"] == (float(stored) if shown != "null" else None)
    # Only the slot is filled in: other text like it stays as it was.
    assert json.loads(frame)["finish_reason"] == other


def test_job_without_session_is_unleased_when_its_done_arrives(
        web: str, r: redis.Redis, connect: Callable[[str], Client]) -> None:
    """Through the real stack: by the time the client has ``done``, the lease and running entry
    are gone (the same call logged the event), and the metrics carry the client TTFT."""
    c = connect(web)
    c.send(type="generate", prompt="one call", max_tokens=1)
    job_id = c.recv()["job_id"]
    done = c.finish({job_id})[job_id][-1]
    assert done["type"] == "done"
    assert r.exists(keys.lease(job_id)) == 0
    assert r.zscore(keys.RUNNING, job_id) is None
    assert r.hget(keys.job(job_id), "ended_by") is not None
    assert "client_ttft_ms" in done["metrics"]


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


def test_a_job_ends_in_one_call(web: str, r: redis.Redis,
                                connect: Callable[[str], Client]) -> None:
    """Every top-level command naming a 1-token job (Redis's slowlog, told to log them all): the
    worker's last is FINISH, with no client TTFT read, no lease or routing release of their own."""
    old = r.config_get("slowlog-*")
    r.config_set("slowlog-max-len", 100_000)
    r.config_set("slowlog-log-slower-than", 0)
    try:
        r.slowlog_reset()
        c = connect(web)
        c.send(type="generate", prompt="count my calls", max_tokens=1)
        job_id = c.recv()["job_id"]
        assert c.finish({job_id})[job_id][-1]["type"] == "done"
        # Commands a script runs are logged too, from the client "?:0": left out.
        entries = [e["command"] for e in reversed(r.slowlog_get(100_000))
                   if e["client_address"] != b"?:0"]
    finally:
        for name, value in old.items():
            r.config_set(name, value)
    mine = [cmd.split(b" ") for cmd in entries if job_id.encode() in cmd]
    scripts = [words[1] for words in mine if words[0].upper() == b"EVALSHA"]
    assert scripts.count(_sha(events.FINISH)) == 1
    assert _sha(jobs.RELEASE) not in scripts
    assert _sha(routing.RELEASE) not in scripts
    assert not [words for words in mine if words[0].upper() == b"HGET"]
    # The FINISH is the worker's last call naming the job.
    assert scripts[-1] == _sha(events.FINISH)


# -- a job's start: the lease and the first pick in one call (tasks/jobs.py START_PICK) --

def test_the_start_picks_the_first_deployment_with_the_lease(store: JobStore,
                                                             router: Router) -> None:
    """The call that takes the lease counts the job on a deployment, once however often retried."""
    job_id = store.create(JobSpec(model="m", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=4, owner="k"))[0]
    token = uuid.uuid4().hex
    start = store.start(job_id, token, 10_000, pick_args=router.first_pick_args())
    assert start.outcome == "started" and start.pick is not None
    route = router.providers.models["m"]
    pick = router.picked(route, start.pick)
    assert pick.deployment == route.deployments[0] and pick.upstream_model == "m"
    assert _served(router) == (1, 0)
    # A retried call (its reply lost) takes nothing more: the job is in flight once.
    again = store.start(job_id, token, 10_000, pick_args=router.first_pick_args())
    assert again.outcome == "started" and _served(router) == (1, 0)
    # What the pick counted is what the worker releases (the record's route_tokens).
    assert store.redis.hget(keys.job(job_id), "route_tokens") == \
        str(routing.estimate_tokens([{"role": "user", "content": "hi"}], 4)).encode()
    router.release(pick, job_id, routing.estimate_tokens([{"role": "user", "content": "hi"}], 4),
                   Outcome(True, 5))
    assert _served(router) == (0, 1)


def test_the_start_picks_nothing_for_a_held_job_or_an_unrouted_record(
        store: JobStore, router: Router) -> None:
    """No pick when another attempt holds the lease, nor for a record without route_tokens."""
    job_id = _started(store, "first")
    held = store.start(job_id, "second", 10_000, pick_args=router.first_pick_args())
    assert held.outcome == "held" and held.pick is None
    # A record stored by an older front end (no route_tokens): started, not picked for.
    old = store.create(JobSpec(model="m", messages=[{"role": "user", "content": "hi"}],
                               max_tokens=4, owner="k"))[0]
    store.redis.hdel(keys.job(old), "route_tokens")
    start = store.start(old, "t", 10_000, pick_args=router.first_pick_args())
    assert start.outcome == "started" and start.pick is None
    assert _served(router) == (0, 0)


def test_a_pick_made_with_the_lease_that_the_attempt_never_sends_is_released(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    """A job cancelled before it started: its start picked a deployment, its attempt ends that request."""
    name = f"{uuid.uuid4().hex[:8]}-a"
    providers = tmp_path / "providers.toml"
    providers.write_text(f'[models.m]\nstrategy = "least-busy"\n\n[deployments.{name}]\n'
                         f'base_url = "http://127.0.0.1:1/v1"\nmodels = ["m"]\n')
    rt = create_celery(Settings(redis_url=redis_server.url,
                                providers_file=str(providers))).sluice
    job_id = rt.jobs.create(JobSpec(model="m", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=4, owner="k"))[0]
    rt.jobs.request_cancel(job_id)
    run_job(rt, job_id)
    last = json.loads(rt.events.read(job_id)[-1][1])
    assert (last["type"], last["code"]) == ("error", "cancelled")
    assert r.hget(keys.deployment(name), "req") == b"1"  # the start picked it
    assert r.zscore(keys.deployment_inflight(name), job_id) is None  # and it was ended
