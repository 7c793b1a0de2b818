"""What routing adds to a job's start: python docs/perf/routing.py [JOBS] [DEPLOYMENTS]

Starts a private redis-server, configures DEPLOYMENTS (default 3) deployments of one model,
and for each strategy runs JOBS (default 5000) jobs' routing one after another: the pick
(choose + count in flight, one Lua call) and the release (one Lua call), as a worker makes
them.  Prints, per strategy, the wall time of each call as the client sees it (p50/p99) and
Redis's own CPU per call (INFO commandstats).  The release comes after the stream, off the
job's start; the pick is what a job's start pays.
"""
import statistics
import sys
import time
import uuid

import redis

from app.cli.dev.redis_server import RedisServer
from tasks.config import Settings
from tasks.deployments import parse_providers
from tasks.routing import Outcome, Router

jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000


with RedisServer() as server:
    client = redis.Redis.from_url(server.url)
    for strategy in ("weighted", "least-busy", "usage", "latency", "ordered"):
        doc = {"models": {"m": {"strategy": strategy}},
               "deployments": {f"d{i}": {"base_url": "http://127.0.0.1:1/v1", "models": ["m"],
                                         "tpm": 10_000_000} for i in range(n)}}
        router = Router(client, parse_providers(doc, Settings()), 600)
        route = router.providers.models["m"]
        client.config_resetstat()
        picks, releases = [], []
        for _ in range(jobs):
            job = uuid.uuid4().hex
            t0 = time.perf_counter()
            pick = router.pick(route, job, 300)
            t1 = time.perf_counter()
            router.release(pick, job, 300, Outcome(True, 280, ttft_s=0.2))
            t2 = time.perf_counter()
            picks.append(t1 - t0)
            releases.append(t2 - t1)
        stats = client.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {})
        print(f"{strategy:<10} pick p50 {pct(picks, .5):.3f} ms  p99 {pct(picks, .99):.3f} ms  "
              f"mean {statistics.mean(picks) * 1000:.3f} ms | release p50 "
              f"{pct(releases, .5):.3f} ms | Redis CPU per call "
              f"{evalsha.get('usec_per_call', 0):.1f} µs")
    client.close()
