"""Token-aware admission against a real redis-server: buckets, refunds, slots, keys, counts."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.admission import Admission, AdmissionRejectedError, Admitted
from app.apikeys import KeyInfo, KeyStore
from app.cli.dev.redis_server import RedisServer, free_port
from app.tiers import Tier
from tasks import keys
from tasks.budget import Budget
from tasks.jobs import JobSpec
from tasks.tokens import count_message_tokens, count_text_tokens, encoding_name_for_model

NO_RETRY = Retry(NoBackoff(), 0)
#: "hi" as one user message: 3 framing + "user" + "hi" + 3 priming.
HI_TOKENS = 8
BASE = Tier("t", tokens_per_minute=6_000, requests_per_minute=10_000,
            max_concurrent_jobs=1_000, max_prompt_tokens=6_000, max_output_tokens=6_000,
            default_output_tokens=100)
#: The OpenAI cookbook's example, billed as 129 prompt tokens by gpt-3.5-turbo-0613 / gpt-4-0613.
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
                                  "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user",
     "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more "
     "bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
                                "for the client deliverable."},
]


def spec(prompt: str = "hi", max_tokens: int = 10, model: str = "mock-1") -> JobSpec:
    return JobSpec(model=model, messages=[{"role": "user", "content": prompt}],
                   max_tokens=max_tokens)


def admission_for(client: redis.Redis, tier: Tier, slot_ttl_s: float = 60.0,
                  fail_open: bool = False) -> Admission:
    return Admission(client, {tier.name: tier}, job_ttl_s=60, slot_ttl_s=slot_ttl_s,
                     fail_open=fail_open)


def new_key(client: redis.Redis, tier: str = "t") -> KeyInfo:
    return KeyStore(client).create("test", tier)[1]


def rejection(adm: Admission, key: KeyInfo, request: JobSpec, **kw: Any) -> AdmissionRejectedError:
    with pytest.raises(AdmissionRejectedError) as info:
        adm.admit(key, request, **kw)
    return info.value


@pytest.fixture
def adm(r: redis.Redis) -> Admission:
    return admission_for(r, BASE)


@pytest.fixture
def key(r: redis.Redis) -> KeyInfo:
    return new_key(r)


# -- token counting ------------------------------------------------------------------------------

def test_token_counts_are_exact_on_known_strings() -> None:
    """Known strings and OpenAI's documented chat example count exactly."""
    assert count_text_tokens("Hello, world!") == 4
    assert count_text_tokens("hello world") == 2
    assert count_text_tokens("<|endoftext|>") == 7  # special markers count as plain text
    assert count_message_tokens([{"role": "user", "content": "hello"}]) == 8
    assert count_message_tokens([{"role": "user", "content": "hello", "name": "bob"}]) == 10
    assert count_message_tokens(COOKBOOK, "gpt-4-0613") == 129
    assert count_message_tokens(COOKBOOK, "gpt-3.5-turbo-0613") == 129


def test_unknown_models_count_with_cl100k() -> None:
    """Models tiktoken does not know (the mock's) count with cl100k_base."""
    assert encoding_name_for_model("mock-1") == "cl100k_base"
    assert count_message_tokens(COOKBOOK, "mock-1") == 129


def test_reservation_is_prompt_plus_max_tokens(adm: Admission, key: KeyInfo) -> None:
    """The reservation is the exact prompt count plus max_tokens, taken from the bucket."""
    ok = adm.admit(key, spec("hi", max_tokens=50))
    assert (ok.prompt_tokens, ok.spec.max_tokens, ok.reserved_tokens) == (HI_TOKENS, 50, 58)
    assert ok.limits is not None and ok.limits.remaining_tokens in (6_000 - 58, 6_000 - 57)


def test_default_output_allowance_without_max_tokens(adm: Admission, key: KeyInfo) -> None:
    """Without max_tokens the tier's default output allowance is reserved and becomes the cap."""
    ok = adm.admit(key, spec("hi", max_tokens=4_000), max_tokens_given=False)
    assert (ok.spec.max_tokens, ok.reserved_tokens) == (100, HI_TOKENS + 100)


# -- the bucket ------------------------------------------------------------------------------------

def _reserve_in_process(url: str, key: KeyInfo, tier: Tier, n: int, go: Any, out: Any) -> None:
    with redis.Redis.from_url(url) as client:
        adm = admission_for(client, tier)
        count_message_tokens(spec().messages)  # load the encoding before the race starts
        out.put("ready")
        go.wait()
        results = []
        for _ in range(n):
            try:
                results.append(adm.admit(key, spec("hi", max_tokens=492)).reserved_tokens)
            except AdmissionRejectedError:
                results.append(0)
        out.put(results)


def test_concurrent_reservations_from_processes_never_overadmit(redis_server: RedisServer,
                                                                 r: redis.Redis) -> None:
    """50 reservations from 5 processes at once admit no more than the bucket holds."""
    tier = replace(BASE, tokens_per_minute=6_000)  # 12 reservations of 500, refilling 100/s
    key = new_key(r)
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_reserve_in_process, args=(redis_server.url, key, tier, 10, go,
                                                           out)) for _ in range(5)]
    for p in procs:
        p.start()
    try:
        assert [out.get(timeout=60) for _ in procs] == ["ready"] * 5
        start = time.monotonic()
        go.set()
        results = [x for _ in procs for x in out.get(timeout=60)]
        window_s = time.monotonic() - start
    finally:
        for p in procs:
            p.join(10)
    admitted = [x for x in results if x]
    assert len(results) == 50 and set(admitted) == {500}
    assert sum(admitted) <= 6_000 + 100 * window_s
    assert len(admitted) >= 12  # a full bucket holds 12: none were refused wrongly


def test_settle_refunds_unused_tokens(adm: Admission, key: KeyInfo) -> None:
    """A job that used fewer tokens than reserved gets the difference back."""
    ok = adm.admit(key, spec("hi", max_tokens=1_000))
    done = adm.settle(ok.job_id, prompt_tokens=HI_TOKENS, completion_tokens=100)
    assert done is not None and done.refunded == 900
    assert adm.limits(key).remaining_tokens >= 6_000 - HI_TOKENS - 100


def test_settle_charges_overage(adm: Admission, key: KeyInfo) -> None:
    """A job that used more than reserved is charged the excess."""
    ok = adm.admit(key, spec("hi", max_tokens=100))
    done = adm.settle(ok.job_id, prompt_tokens=HI_TOKENS + 400, completion_tokens=100)
    assert done is not None and done.refunded == -400
    assert done.remaining_tokens <= 6_000 - HI_TOKENS - 500 + 5  # + refill while settling


@pytest.mark.parametrize(("ending", "prompt", "completion", "refund"), [
    ("cancelled mid-stream", HI_TOKENS, 30, 470),
    ("failed before the provider answered", 0, 0, HI_TOKENS + 500),
    ("provider reported no usage", None, 500, 0),
])
def test_every_ending_reconciles(adm: Admission, key: KeyInfo, ending: str,
                                 prompt: int | None, completion: int, refund: int) -> None:
    """Cancelled and failed jobs settle with what they used (None = the admission count)."""
    ok = adm.admit(key, spec("hi", max_tokens=500))
    done = adm.settle(ok.job_id, prompt, completion)
    assert done is not None and done.refunded == refund, ending


def test_settle_twice_charges_once(adm: Admission, key: KeyInfo, r: redis.Redis) -> None:
    """Settling a job again (a re-run, a duplicate message) changes nothing."""
    ok = adm.admit(key, spec("hi", max_tokens=1_000))
    assert adm.settle(ok.job_id, HI_TOKENS, 10) is not None
    level = float(r.hget(keys.bucket(key.key_id), "tokens") or 0)
    assert adm.settle(ok.job_id, HI_TOKENS, 10) is None
    assert adm.settle(ok.job_id, 0, 0) is None
    assert float(r.hget(keys.bucket(key.key_id), "tokens") or 0) == level
    day = adm.usage(key.key_id, 1)[0]
    assert (day.requests, day.prompt_tokens, day.completion_tokens) == (1, HI_TOKENS, 10)


def test_retry_after_is_exact(r: redis.Redis) -> None:
    """Retrying before retry_after fails; retrying after it succeeds."""
    tier = replace(BASE, tokens_per_minute=12_000, max_output_tokens=12_000)  # 200 tokens/s
    adm, key = admission_for(r, tier), new_key(r)
    adm.admit(key, spec("hi", max_tokens=12_000 - HI_TOKENS))  # drain the bucket
    first = rejection(adm, key, spec("hi", max_tokens=100 - HI_TOKENS))
    assert first.code == "rate_limited" and first.retry_after is not None
    assert 0.4 <= first.retry_after <= 0.5  # 100 tokens at 200/s, minus the refill since
    time.sleep(first.retry_after * 0.6)
    early = rejection(adm, key, spec("hi", max_tokens=100 - HI_TOKENS))
    assert early.retry_after is not None and early.retry_after < first.retry_after * 0.5
    time.sleep(early.retry_after)
    assert adm.admit(key, spec("hi", max_tokens=100 - HI_TOKENS)).reserved_tokens == 100


def test_requests_per_minute_limit(r: redis.Redis) -> None:
    """Past its requests per minute a key waits for the request bucket to refill."""
    adm, key = admission_for(r, replace(BASE, requests_per_minute=2)), new_key(r)
    adm.admit(key, spec())
    adm.admit(key, spec())
    refused = rejection(adm, key, spec())
    assert refused.code == "rate_limited" and refused.retry_after is not None
    assert 29 < refused.retry_after <= 30  # one request refills in 60 / 2 seconds
    assert refused.headers()["Retry-After"] == "30"
    assert refused.headers()["x-ratelimit-remaining-requests"] == "0"


def test_light_user_not_blocked_by_heavy_user(r: redis.Redis) -> None:
    """A heavy key sending huge prompts is refused while a light key's tiny prompts all pass."""
    adm = admission_for(r, replace(BASE, tokens_per_minute=20_000, requests_per_minute=100))
    heavy, light = new_key(r), new_key(r)
    huge = " ".join(["word"] * 4_500)  # 4,507 prompt tokens
    heavy_admitted = 0
    for _ in range(10):
        try:
            adm.admit(heavy, spec(huge, max_tokens=1_000))
            heavy_admitted += 1
        except AdmissionRejectedError as e:
            assert e.code == "rate_limited"
    assert heavy_admitted == 3  # 3 x 5,507 tokens fit in 20,000; a 4th never refills in time
    for _ in range(50):
        adm.admit(light, spec("hi", max_tokens=10))


# -- concurrency slots ----------------------------------------------------------------------------

def test_concurrency_cap_released_by_settle(r: redis.Redis) -> None:
    """At the cap a key is refused until one of its jobs settles."""
    adm, key = admission_for(r, replace(BASE, max_concurrent_jobs=2)), new_key(r)
    first = adm.admit(key, spec())
    adm.admit(key, spec())
    refused = rejection(adm, key, spec())
    assert refused.code == "concurrency_limit" and refused.limits is not None
    assert refused.limits.active_jobs == 2
    adm.settle(first.job_id, HI_TOKENS, 3)
    adm.admit(key, spec())


def test_vanished_job_slot_is_reclaimed_after_deadline(r: redis.Redis) -> None:
    """A slot whose job never settles is reclaimed once its deadline passes."""
    adm = admission_for(r, replace(BASE, max_concurrent_jobs=1), slot_ttl_s=0.3)
    key = new_key(r)
    adm.admit(key, spec())  # its job vanishes: never settled
    admitted_at = time.monotonic()
    assert rejection(adm, key, spec()).code == "concurrency_limit"
    ok: Admitted | None = None
    while ok is None:
        try:
            ok = adm.admit(key, spec())
        except AdmissionRejectedError as e:
            assert e.code == "concurrency_limit"
            assert time.monotonic() - admitted_at < 5, "the slot was never reclaimed"
            time.sleep(0.02)
    assert time.monotonic() - admitted_at >= 0.25


def test_touch_renews_a_running_jobs_slot(r: redis.Redis) -> None:
    """Budget.touch() (the worker's heartbeat) keeps a live job's slot past its first deadline; settled jobs have none."""
    adm = admission_for(r, replace(BASE, max_concurrent_jobs=1), slot_ttl_s=0.3)
    key = new_key(r)
    running = adm.admit(key, spec())
    for _ in range(4):
        time.sleep(0.15)
        assert Budget(r).touch(running.job_id, 300)
    assert rejection(adm, key, spec()).code == "concurrency_limit"
    adm.settle(running.job_id, HI_TOKENS, 1)
    assert not Budget(r).touch(running.job_id, 300)


# -- tiers and sizes -------------------------------------------------------------------------------

def test_model_not_allowed(r: redis.Redis, key: KeyInfo) -> None:
    """A tier limited to some models refuses others, naming the model."""
    adm = admission_for(r, replace(BASE, models=("mock-1",)))
    refused = rejection(adm, key, spec(model="mock-2"))
    assert refused.code == "model_not_allowed" and "'mock-2'" in refused.message


@pytest.mark.parametrize(("request_", "named"), [
    (spec("word " * 6_001), "prompt has 6009 tokens"),
    (spec(max_tokens=6_001), "max_tokens 6001"),
    (spec("word " * 3_000, max_tokens=3_000), "needs 6008 tokens"),
])
def test_too_large_requests_are_refused(adm: Admission, key: KeyInfo, request_: JobSpec,
                                        named: str) -> None:
    """Prompts, outputs or reservations beyond the tier are refused as too_large, no retry."""
    refused = rejection(adm, key, request_)
    assert refused.code == "too_large" and refused.retry_after is None
    assert named in refused.message


def test_unreachable_redis_fails_closed() -> None:
    """Without Redis the default is to refuse with unavailable, never to admit silently."""
    with redis.Redis(port=free_port(), retry=NO_RETRY) as dead:
        adm = admission_for(dead, BASE)
        refused = rejection(adm, KeyInfo("k", "k", "t", 0), spec())
    assert refused.code == "unavailable" and refused.http_status == 503


def test_unreachable_redis_can_fail_open() -> None:
    """With fail_open a request is admitted unenforced when Redis is down."""
    with redis.Redis(port=free_port(), retry=NO_RETRY) as dead:
        ok = admission_for(dead, BASE, fail_open=True).admit(KeyInfo("k", "k", "t", 0), spec())
    assert not ok.enforced and ok.limits is None


# -- API keys --------------------------------------------------------------------------------------

def test_key_lifecycle(r: redis.Redis) -> None:
    """A created key verifies, is listed and shown, and once revoked is refused."""
    store = KeyStore(r)
    raw, info = store.create("alice", "pro")
    assert raw.startswith("sk-sluice-") and len(raw) >= 50
    assert store.verify(raw) == info
    assert info in store.list() and store.get(info.key_id) == info
    revoked = store.revoke(info.key_id)
    assert revoked.state == "revoked" and revoked.revoked_ms
    assert store.verify(raw) is None
    assert store.get(info.key_id) == revoked


@pytest.mark.parametrize("presented", ["", "Bearer x", "sk-sluice-", "sk-sluice-" + "A" * 43,
                                       "sk-other-abc", "sk-sluice-" + "A" * 500])
def test_unknown_keys_are_refused(r: redis.Redis, presented: str) -> None:
    """Malformed, unknown and overlong keys do not verify."""
    assert KeyStore(r).verify(presented) is None


def _everything_in(client: redis.Redis) -> Iterator[Any]:
    for name in client.scan_iter(count=1_000):
        yield name
        kind = client.type(name).decode()  # type: ignore[union-attr]
        if kind == "string":
            yield client.get(name) or b""
        elif kind == "hash":
            yield from (x for kv in client.hgetall(name).items() for x in kv)
        elif kind == "zset":
            yield from client.zrange(name, 0, -1)
        elif kind == "list":
            yield from client.lrange(name, 0, -1)
        elif kind == "set":
            yield from client.smembers(name)
        elif kind == "stream":
            entries: Any = client.xrange(name)
            yield from (x for _, fields in entries for kv in fields.items() for x in kv)


def test_raw_key_is_nowhere_in_redis(r: redis.Redis) -> None:
    """Only the key's hash is stored: no Redis key name or value contains the raw key."""
    raw, info = KeyStore(r).create("bob", "t")
    adm = admission_for(r, BASE)
    ok = adm.admit(info, spec())
    adm.settle(ok.job_id, HI_TOKENS, 2)
    secret = raw.encode()
    assert not [x for x in _everything_in(r) if secret in x or raw[10:].encode() in x]


def test_a_job_admitted_but_never_stored_is_refunded_once_its_grace_is_over(
        r: redis.Redis, adm: Admission, key: KeyInfo) -> None:
    """A front end that dies between admission and storing the job leaves a slot and a reservation: the sweep gives both back, and leaves stored jobs alone."""
    from tasks.jobs import JobStore
    full = adm.limits(key).remaining_tokens
    orphan = adm.admit(key, spec(max_tokens=100))
    stored = adm.admit(key, spec(max_tokens=100))
    JobStore(r, 60).create(stored.spec, stored.job_id)
    assert r.zcard(keys.slots(key.key_id)) == 2
    assert adm.budget.refund_orphans(grace_ms=60_000) == []  # both still in their grace
    assert r.zscore(keys.ADMITTED, orphan.job_id) is not None
    refunded = adm.budget.refund_orphans(grace_ms=0)
    assert orphan.job_id in refunded and stored.job_id not in refunded
    assert r.zscore(keys.ADMITTED, orphan.job_id) is None
    assert r.zscore(keys.ADMITTED, stored.job_id) is None
    assert r.zrange(keys.slots(key.key_id), 0, -1) == [stored.job_id.encode()]
    assert not r.exists(keys.reservation(orphan.job_id))
    assert r.exists(keys.reservation(stored.job_id))
    # Only the stored job's reservation is still out of the bucket (give or
    # take what the bucket refilled meanwhile).
    left = adm.limits(key).remaining_tokens
    assert full - stored.reserved_tokens <= left < full - stored.reserved_tokens + 50
    assert orphan.job_id not in adm.budget.refund_orphans(grace_ms=0)  # once only
