"""Chaos: 200 streams over several front ends and workers while processes die by ``kill -9``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from app.apikeys import KeyStore
from app.cli.bench.config import StackOptions
from app.cli.bench.stack import Stack
from app.cli.soak.audit import held
from app.cli.soak.chaos import Killer
from app.cli.soak.streams import Fleet, Tally
from tasks import keys
from tests.conftest import wait_for

STREAMS = 200
SUBMIT_S = 30.0  # kills happen while jobs are being sent; then the open jobs finish
DRAIN_S = 20.0
KILL_EVERY_S = 4.0
#: Error codes a job may honestly end with when its model or Redis went away.
CLEAR_ERRORS = {"error:provider_unavailable", "error:provider_stream_broken", "error:timeout",
                "error:unavailable"}
# A limited tier: every admitted job holds a slot and a reservation until it
# settles, so anything a crash leaks is left in Redis for the audit to see.
TIERS = """
[tiers.chaos]
tokens_per_minute = 10_000_000
requests_per_minute = 1_000_000
max_concurrent_jobs = 250
max_prompt_tokens = 1_000
max_output_tokens = 100
default_output_tokens = 50
"""


def _unfinished(client: redis.Redis, tally: Tally, stack: Stack) -> list[dict[str, Any]]:
    """What Redis says about each job that did not end well, for the failure report."""
    out = []
    queued = b"".join(client.lrange("sluice", 0, -1))  # Celery's queue of generation jobs
    unacked = b"".join(client.hvals("unacked"))  # delivered to a worker, not yet acked
    for job in tally.jobs:
        verdict = job.verdict(stack.mock_config)
        if verdict in ("done", "unacknowledged") or verdict in CLEAR_ERRORS or not job.job_id:
            continue
        record = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(job.job_id)).items()
                  if k.decode() in ("status", "seq", "attempts", "started_ms", "ended_ms")}
        out.append({"job_id": job.job_id, "verdict": verdict, "client_last_seq": job.last_seq,
                    "restarts_seen": job.restarts, "client_resumes": job.resumes,
                    "record": record,
                    "lease_ttl_ms": client.pttl(keys.lease(job.job_id)),
                    "in_running": client.zscore(keys.RUNNING, job.job_id) is not None,
                    "in_unstarted": client.zscore(keys.UNSTARTED, job.job_id) is not None,
                    "in_broker_queue": job.job_id.encode() in queued,
                    "in_broker_unacked": job.job_id.encode() in unacked,
                    "log_length": client.xlen(keys.log(job.job_id))})
    return out


@pytest.mark.timeout(300)
# The stack's worker pings (kombu, from the killer's thread) may leave a broker
# socket of a killed stack for the garbage collector; that is the tool, not Sluice.
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
def test_streams_lose_and_repeat_nothing_while_workers_and_front_ends_are_killed(
        tmp_path: Path) -> None:
    """Kill -9 a worker or front end every few seconds: every job ends done with its exact text or a clear error, seq runs have no gap or repeat, and no slot or reservation is left."""
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TIERS)
    opts = StackOptions(workers=3, worker_concurrency=150, webs=3, mock_ttft_ms=100,
                        mock_itl_ms=150, mock_output_tokens=50,
                        env=(("SLUICE_TIERS_FILE", str(tiers)), ("SLUICE_LEASE_TTL_S", "2"),
                             ("SLUICE_PROVIDER_MAX_RETRIES", "0")))
    stack = Stack(opts, model="mock-1", log_dir=tmp_path / "stack")
    try:
        stack.start()
        client = redis.Redis.from_url(stack.redis_url)
        key, info = KeyStore(client).create("chaos", "chaos")
        fleet = Fleet(lambda: list(stack.urls), key, "mock-1", STREAMS, max_tokens=(20, 30, 40))
        killer = Killer(stack, KILL_EVERY_S, seed=7)

        async def scenario() -> Tally:
            killer.start()
            run = asyncio.create_task(fleet.run(SUBMIT_S, DRAIN_S))
            await asyncio.sleep(SUBMIT_S)
            await asyncio.to_thread(killer.stop)
            return await run

        tally = asyncio.run(scenario())
        unfinished = _unfinished(client, tally, stack)
        report = {**tally.summary(stack.mock_config), "kills": dict(killer.kills),
                  "killer": killer.log, "replacement_errors": killer.errors,
                  "unfinished": unfinished}
        print(json.dumps(report, indent=1))
        verdicts = tally.verdicts(stack.mock_config)
        assert killer.kills["worker"] >= 2 and killer.kills["web"] >= 2, report
        assert not killer.errors, report
        assert tally.lost == 0 and tally.duplicated == 0, report
        assert set(verdicts) <= {"done", "unacknowledged"} | CLEAR_ERRORS, report
        assert not tally.refused, report
        assert sum(j.restarts for j in tally.jobs) > 0, "no worker died with a job running"
        assert sum(j.resumes for j in tally.jobs) > 0, "no client had to resume elsewhere"
        # Every job the clients know of ended; a job whose 'queued' never came (its
        # front end died) was sent again as a new job, and if it was stored it
        # runs to its end unwatched: the audit below sees it settle.
        assert verdicts["open"] == 0, report

        def left_behind() -> dict[str, list[str]]:
            return {**held(client, info.key_id),
                    "unstarted": sorted(j.decode() for j in client.zrange(keys.UNSTARTED, 0, -1))}
        try:
            wait_for(lambda: not any(left_behind().values()), 15,
                     "every job's slot, reservation and index entries to be released")
        except AssertionError:
            left = left_behind()
            statuses = {j: (client.hget(keys.job(j), "status") or b"").decode()
                        for j in {*left["slots"], *left["running"], *left["unstarted"]}}
            raise AssertionError(f"left behind: {left}; statuses: {statuses}") from None
        client.close()
    finally:
        stack.stop()
