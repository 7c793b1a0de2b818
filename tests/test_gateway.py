"""The provider gateway with real parts: several mock deployments, a real worker, a real front end.

One providers file for the module: three equal deployments (``good1..3``),
one failing every request with a 500, one answering 429 with Retry-After, one
cutting every stream after three tokens; a model per behaviour under test.
"""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from app.cli.dev.mockllm import MockConfig, expected_text
from app.cli.dev.redis_server import RedisServer, free_port
from tasks.config import Settings
from tasks.deployments import ProvidersConfigError, load_providers, parse_providers
from tasks.routing import DeploymentState, Outcome, Router
from tests.conftest import (
    BIN,
    MOCK,
    ROOT,
    Client,
    Proc,
    start_mock,
    start_web,
    start_worker,
    text_of,
    wait_for,
)
from workers.provider import duration_s, retry_after

SHARE_MODELS = {"weighted": "m-weighted", "least-busy": "m-least", "usage": "m-usage",
                "latency": "m-latency"}
#: Jobs per strategy in the share test, and the share each of three equal
#: deployments must get: 1/3 expected, anything in [1/6, 1/2] passes (a
#: weighted draw of 90 falls outside with probability about 1e-4).
SHARE_JOBS = 90
SHARE_RANGE = (SHARE_JOBS // 6, SHARE_JOBS // 2)
COOLDOWN_S = 8


def providers_toml(urls: dict[str, str]) -> str:
    """Each strategy gets three deployments of its own on the three equal mocks, so the
    counters one test leaves behind never tilt another's share."""
    share = "".join(
        f'[models.{model}]\nstrategy = "{strategy}"\n'
        + "".join(f'[deployments.{strategy}-{i}]\nbase_url = "{urls[f"good{i}"]}"\n'
                  f'models = {{ {model} = "mock-1" }}\n' for i in (1, 2, 3))
        for strategy, model in SHARE_MODELS.items())
    return f"""
[gateway]
cooldown_s = {COOLDOWN_S}
allowed_fails = 2
fail_window_s = 60
max_attempts = 3
backoff_s = 0.05

{share}
[models.m-failover]
strategy = "least-busy"
[models.m-retry]
strategy = "ordered"
deployments = ["bad429", "good2"]
[models.m-cut]
strategy = "ordered"
deployments = ["cutter", "good3"]
[models.m-gpu]
queue = "gw-gpu"

[deployments.good1]
base_url = "{urls['good1']}"
api_key_env = "GW_TEST_KEY"
models = {{ m-failover = "mock-1", m-gpu = "mock-1" }}

[deployments.good2]
base_url = "{urls['good2']}"
models = {{ m-retry = "mock-1" }}

[deployments.good3]
base_url = "{urls['good3']}"
models = {{ m-cut = "mock-1" }}

[deployments.bad500]
base_url = "{urls['bad500']}"
models = {{ m-failover = "mock-1" }}

[deployments.bad429]
base_url = "{urls['bad429']}"
models = {{ m-retry = "mock-1" }}

[deployments.metered]
base_url = "{urls['metered']}"
models = {{ m-metered = "mock-1" }}

[deployments.cutter]
base_url = "{urls['cutter']}"
models = {{ m-cut = "mock-1" }}
"""


@pytest.fixture(scope="module")
def mocks(start_proc: Callable[..., Proc]) -> dict[str, str]:
    urls = {name: start_mock(start_proc)[1] for name in ("good1", "good2", "good3")}
    urls["bad500"] = start_mock(start_proc, fail_rate=1.0, fail_mode="500")[1]
    urls["bad429"] = start_mock(start_proc, fail_rate=1.0, fail_mode="429",
                                retry_after_s=30.0)[1]
    urls["metered"] = start_mock(start_proc, ratelimit_tpm=100_000)[1]
    urls["cutter"] = start_mock(start_proc, fail_rate=1.0, fail_mode="cut", cut_after=3)[1]
    return urls


@pytest.fixture(scope="module")
def gw_env(sluice_env: dict[str, str], mocks: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("gateway") / "providers.toml"
    path.write_text(providers_toml(mocks))
    models = ",".join(["mock-1", *SHARE_MODELS.values(), "m-failover", "m-retry", "m-cut",
                       "m-gpu", "m-metered"])
    return {**sluice_env, "SLUICE_PROVIDERS": str(path), "SLUICE_QUEUE": "gw",
            "SLUICE_MODELS": models, "SLUICE_METRICS_PORT": str(free_port()),
            "SLUICE_QUEUE_HEARTBEAT_S": "0.5", "GW_TEST_KEY": "sk-gw"}


@pytest.fixture(scope="module")
def gw_web(start_proc: Callable[..., Proc], gw_env: dict[str, str]) -> Iterator[str]:
    # Stopped with the module: later modules find only their own workers (Flower lists all).
    worker = start_worker(start_proc, gw_env, "gw")
    yield start_web(start_proc, gw_env)
    worker.stop()


@pytest.fixture(scope="module")
def router(gw_env: dict[str, str], redis_server: RedisServer) -> Router:
    settings = Settings.from_env(gw_env)
    return Router(redis.Redis.from_url(redis_server.url), load_providers(settings),
                  settings.job_timeout_s)


def state(router: Router, name: str) -> DeploymentState:
    return next(s for s in router.states() if s.name == name)


def mock_requests(base_url: str) -> int:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as r:
        return int(json.loads(r.read())["requests"])


def run_jobs(c: Client, model: str, n: int, prompt: str = "gateway",
             max_tokens: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Submit ``n`` jobs at once on one socket; return each job's events once all ended."""
    for i in range(n):
        c.send(type="generate", prompt=f"{prompt} {i}", model=model, max_tokens=max_tokens)
    ids = {c.until(lambda f: f.get("type") == "queued")["job_id"] for _ in range(n)}
    return {j: ev for j, ev in c.finish(ids).items() if j in ids}


def test_failing_deployment_fails_over_then_cools_down_then_comes_back(
        gw_web: str, gw_env: dict[str, str], mocks: dict[str, str], router: Router,
        connect: Callable[[str], Client]) -> None:
    """Every job succeeds via the healthy deployment; the failing one cools down, then is tried again."""
    c = connect(gw_web)
    jobs = run_jobs(c, "m-failover", 20)
    ends = [ev[-1] for ev in jobs.values()]
    assert all(e["type"] == "done" for e in ends), ends
    assert {e["metrics"]["deployment"] for e in ends} == {"good1"}
    assert any(e["metrics"]["tried"] == ["bad500", "good1"] for e in ends)
    assert all(e["metrics"]["attempts"] == 1 for e in ends)
    assert mock_requests(mocks["bad500"]) >= 2
    # The operator's view: cooling down, shared in Redis.
    out = subprocess.run([str(BIN / "sluice"), "providers", "--json"], cwd=ROOT, check=True,
                         env={**os.environ, **gw_env}, capture_output=True, text=True).stdout
    rows = {row["name"]: row for row in map(json.loads, out.splitlines())}
    assert rows["bad500"]["state"].startswith("cooling down until"), rows["bad500"]
    assert rows["bad500"]["cooldown_reason"] == "failures"
    assert rows["good1"]["state"] == "healthy"
    # The same figures on the worker's /metrics, labelled by deployment name.
    port = gw_env["SLUICE_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'sluice_deployment_in_flight{deployment="good1"}' in metrics
    assert 'sluice_deployment_cooldown_seconds{deployment="bad500"}' in metrics
    assert 'sluice_failovers_total{code="provider_500",deployment="bad500"}' in metrics
    # It comes back by itself and gets requests again.
    wait_for(lambda: state(router, "bad500").cooldown_ms == 0, COOLDOWN_S + 30,
             "bad500's cooldown to end")
    before = mock_requests(mocks["bad500"])
    for _ in range(30):
        assert run_jobs(c, "m-failover", 1).popitem()[1][-1]["type"] == "done"
        if mock_requests(mocks["bad500"]) > before:
            break
    assert mock_requests(mocks["bad500"]) > before


def test_retry_after_cools_the_deployment_for_that_long(
        gw_web: str, router: Router, connect: Callable[[str], Client]) -> None:
    """A 429 with Retry-After fails over at once and keeps every worker off it for Retry-After."""
    c = connect(gw_web)
    first = run_jobs(c, "m-retry", 1).popitem()[1][-1]
    assert first["type"] == "done" and first["metrics"]["tried"] == ["bad429", "good2"], first
    s = state(router, "bad429")
    assert s.cooldown_reason == "retry-after" and 0 < s.cooldown_ms <= 30_000
    second = run_jobs(c, "m-retry", 1).popitem()[1][-1]
    assert second["type"] == "done" and second["metrics"]["tried"] == ["good2"], second


def test_stream_cut_after_tokens_restarts_on_another_deployment(
        gw_web: str, connect: Callable[[str], Client]) -> None:
    """A deployment that cuts the stream: the client sees tokens, restart, then the whole text."""
    c = connect(gw_web)
    ev = run_jobs(c, "m-cut", 1, prompt="cut me", max_tokens=10).popitem()[1]
    kinds = [e["type"] for e in ev]
    assert "restart" in kinds and kinds[-1] == "done", kinds
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    restart = ev[kinds.index("restart")]
    assert restart["reason"] == "failover" and restart["deployment"] == "good3"
    assert text_of(ev) == expected_text("cut me 0", 10, MockConfig(**MOCK))
    done = ev[-1]
    assert done["metrics"]["tried"] == ["cutter", "good3"]
    assert done["metrics"]["deployment"] == "good3"
    assert done["usage"]["completion_tokens"] == 10


def test_openai_sdk_waits_through_a_failover_restart(gw_web: str, api_key: str) -> None:
    """A non-streaming OpenAI request on a deployment that cuts its stream gets the whole re-run."""
    base = gw_web.replace("ws://", "http://").removesuffix("/ws") + "/v1"
    with openai.OpenAI(base_url=base, api_key=api_key, max_retries=0) as c:
        completion = c.chat.completions.create(
            model="m-cut", messages=[{"role": "user", "content": "cut the sdk"}], max_tokens=10)
    assert completion.choices[0].message.content == expected_text(
        "cut the sdk", 10, MockConfig(**MOCK))
    assert completion.usage is not None and completion.usage.completion_tokens == 10


def test_provider_rate_limit_headers_reach_the_shared_state(
        gw_web: str, router: Router, connect: Callable[[str], Client]) -> None:
    """A provider's x-ratelimit-remaining-tokens is stored for usage routing and shown to operators."""
    c = connect(gw_web)
    assert run_jobs(c, "m-metered", 1).popitem()[1][-1]["type"] == "done"
    remaining = state(router, "metered").provider_remaining_tokens
    assert remaining is not None and 0 < remaining < 100_000


def test_retry_after_and_reset_headers_parse() -> None:
    """Retry-After in seconds, ms or as a date; OpenAI's reset durations such as 1m30s or 20ms."""
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 50 < (retry_after({"retry-after": email.utils.formatdate(time.time() + 60)}) or 0) <= 60
    assert retry_after({}) is None
    assert duration_s("1m30s") == 90.0 and duration_s("20ms") == 0.02
    assert duration_s("1.5s") == 1.5 and duration_s(None) is None


@pytest.mark.parametrize("strategy", list(SHARE_MODELS))
def test_equal_deployments_share_concurrent_jobs_evenly(
        gw_web: str, connect: Callable[[str], Client], strategy: str) -> None:
    """Three equal deployments each serve between 1/6 and 1/2 of 90 concurrent jobs."""
    c = connect(gw_web)
    jobs = run_jobs(c, SHARE_MODELS[strategy], SHARE_JOBS)
    ends = [ev[-1] for ev in jobs.values()]
    assert all(e["type"] == "done" for e in ends)
    share = Counter(e["metrics"]["deployment"] for e in ends)
    assert set(share) == {f"{strategy}-{i}" for i in (1, 2, 3)}, share
    assert all(SHARE_RANGE[0] <= n <= SHARE_RANGE[1] for n in share.values()), share


def test_model_queue_routes_jobs_to_its_worker_pool(
        start_proc: Callable[..., Proc], gw_web: str, gw_env: dict[str, str],
        redis_server: RedisServer, connect: Callable[[str], Client]) -> None:
    """A model's jobs go on its queue, /readyz names it while no worker consumes it, its pool runs them."""
    health = gw_web.replace("ws://", "http://").removesuffix("/ws") + "/readyz"

    def readyz() -> dict[str, Any]:
        with urllib.request.urlopen(health, timeout=5) as r:
            return dict(json.loads(r.read()))

    wait_for(lambda: readyz().get("queues_without_workers") == {"gw-gpu": ["m-gpu"]}, 30,
             "/readyz to name the queue without workers")
    c = connect(gw_web)
    c.send(type="generate", prompt="on the gpu", model="m-gpu", max_tokens=4)
    job_id = c.until(lambda f: f.get("type") == "queued")["job_id"]
    with redis.Redis.from_url(redis_server.url) as r:
        wait_for(lambda: r.llen("gw-gpu") == 1, 10, "the job on queue gw-gpu")
    gpu = start_worker(start_proc, {**gw_env, "SLUICE_QUEUE": "gw-gpu",
                                    "SLUICE_METRICS_PORT": "0"}, "gpu")
    try:
        ev = c.finish({job_id})[job_id]
        assert ev[-1]["type"] == "done"
        wait_for(lambda: "Task sluice.generate" in gpu.log(), 10, "the gpu worker to log it")
        wait_for(lambda: "queues_without_workers" not in readyz(), 30, "/readyz to clear")
    finally:
        gpu.stop()


def test_bad_providers_file_names_the_line_and_field(tmp_path: Path) -> None:
    """A bad value is reported with the file, its line and the field."""
    path = tmp_path / "p.toml"
    path.write_text('[deployments.a]\nbase_url = "http://x/v1"\nmodels = ["m"]\nweight = -1\n')
    with pytest.raises(ProvidersConfigError, match=r"p.toml:4: deployments.a.weight: must be > 0"):
        load_providers(Settings(providers_file=str(path)))
    path.write_text('[deployments.a]\nbase_url = "http://x/v1"\napi_key = "sk-secret"\n')
    with pytest.raises(ProvidersConfigError, match=r":3: deployments.a.api_key: keys never go"):
        load_providers(Settings(providers_file=str(path)))
    path.write_text('[models.m]\nstrategy = "fastest"\n[deployments.a]\n'
                    'base_url = "http://x/v1"\nmodels = ["m"]\n')
    with pytest.raises(ProvidersConfigError, match=r":2: models.m.strategy: unknown strategy"):
        load_providers(Settings(providers_file=str(path)))


# -- the router alone, against the real Redis --------------------------------------------------

def make_router(redis_server: RedisServer, strategy: str, tpm: int = 0) -> Router:
    tag = uuid.uuid4().hex[:8]
    doc = {"models": {"m": {"strategy": strategy}},
           "deployments": {f"{tag}-{d}": {"base_url": "http://127.0.0.1:1/v1", "models": ["m"],
                                          "tpm": tpm} for d in ("a", "b")}}
    return Router(redis.Redis.from_url(redis_server.url), parse_providers(doc, Settings()), 600)


def test_pick_counts_in_flight_and_a_rerun_drops_the_dead_attempts_count(
        redis_server: RedisServer) -> None:
    """A pick counts the job in flight; the same job picked again (its re-run) is counted once."""
    router = make_router(redis_server, "least-busy")
    route = router.providers.models["m"]
    router.pick(route, "job1", 100)
    rerun = router.pick(route, "job1", 100)
    assert sum(s.in_flight for s in router.states()) == 1
    second = router.pick(route, "job2", 100)
    assert second.deployment != rerun.deployment  # least busy
    router.release(second, "job2", 100, Outcome(True, 50))
    assert sum(s.in_flight for s in router.states()) == 1


def test_deployments_at_their_tpm_are_skipped_until_the_next_minute(
        redis_server: RedisServer) -> None:
    """With every deployment's TPM spent, a pick says how long until the next minute."""
    router = make_router(redis_server, "usage", tpm=1000)
    route = router.providers.models["m"]
    picks = [router.pick(route, f"j{i}", 600) for i in range(3)]
    assert {p.deployment for p in picks[:2]} == set(route.deployments)
    assert picks[2].deployment is None and 0 < picks[2].wait_s <= 60


def test_provider_remaining_tokens_steer_usage_routing(redis_server: RedisServer) -> None:
    """A deployment whose provider reports too few remaining tokens gets no request until they reset."""
    router = make_router(redis_server, "usage")
    route = router.providers.models["m"]
    a, b = route.deployments
    pick = router.pick(route, "j0", 10)
    low = pick.deployment
    router.release(pick, "j0", 10, Outcome(True, 10, remaining_tokens=50, reset_s=60))
    assert all(router.pick(route, f"j{i}", 100).deployment == ({a, b} - {low}).pop()
               for i in range(1, 6))


def test_untried_only_never_returns_a_deployment_already_tried(
        redis_server: RedisServer) -> None:
    """After tokens were streamed, only a deployment the job has not tried may regenerate."""
    router = make_router(redis_server, "ordered")
    route = router.providers.models["m"]
    a, b = route.deployments
    assert router.pick(route, "j", 10, [a], untried_only=True).deployment == b
    assert router.pick(route, "j", 10, [a, b], untried_only=True).deployment is None
    assert router.pick(route, "j", 10, [a, b]).deployment == a
