"""The ``bulk`` frame and held ``generate``s, over real sockets, front ends, workers and pump."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import redis

from app.apikeys import KeyInfo, KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tasks.admission import Admission
from tasks.config import Settings
from tasks.tokens import count_message_tokens
from tests.conftest import MOCK, Client, Proc, start_web, text_of, wait_for

CONFIG = MockConfig(**MOCK)


@pytest.fixture(scope="module")
def admission(sluice_env: dict[str, str]) -> Iterator[Admission]:
    """The gateway's admission controller, in the test process (to drain buckets, read usage)."""
    settings = Settings.from_env(sluice_env)
    client = settings.redis_client()
    yield Admission.from_settings(settings, client)
    client.close()


@pytest.fixture(scope="module")
def big_web(start_proc: Callable[..., Proc], sluice_env: dict[str, str], worker: Proc) -> str:
    """A front end that takes large bulk frames: 100 kB frames, 300 follows, 250 items a
    frame, 300 items pending per key."""
    return start_web(start_proc, {**sluice_env, "SLUICE_MAX_FRAME_BYTES": "100000",
                                  "SLUICE_MAX_FOLLOWS_PER_SOCKET": "300",
                                  "SLUICE_BULK_MAX_ITEMS": "250",
                                  "SLUICE_BULK_MAX_PENDING": "300"})


def new_key(r: redis.Redis, tier: str) -> tuple[str, KeyInfo]:
    return KeyStore(r).create("ws-bulk-test", tier)


def drain(admission: Admission, key: KeyInfo, leave: int = 0) -> int:
    """Empty the key's token bucket but ``leave`` tokens, as if a big job had just run.

    :return: Redis's time (ms) just before: the bucket refills from then on.
    """
    tier = admission.tier_of(key)
    need = tier.tokens_per_minute - leave
    seconds, micros = admission.budget.redis.time()
    admission.budget.reserve(key.key_id, "drain" + key.key_id, need, tier.rates,
                             prompt_tokens=need, slot_ttl_ms=60_000, reservation_ttl_s=60)
    admission.budget.settle("drain" + key.key_id, need, 0)
    return int(seconds) * 1000 + int(micros) // 1000


def item(i: int, prompt: str, max_tokens: int = 4, **fields: Any) -> dict[str, Any]:
    return {"ref": i, "prompt": prompt, "max_tokens": max_tokens, **fields}


def run_bulk(c: Client, log_id: str, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Receive until the bulk's log and every item's log have ended; return each log's frames."""
    return c.finish({*job_ids, log_id})


def expected(prompt: str, max_tokens: int = 4) -> str:
    return expected_text([{"role": "user", "content": prompt}], max_tokens, CONFIG)


def leaks(r: redis.Redis, key_id: str) -> dict[str, Any]:
    """What a key may hold in Redis between requests; all empty when nothing leaked."""
    return {"slots": r.zcard(keys.slots(key_id)), "pending": r.hget(keys.BULK_PENDING, key_id),
            "held_bulks": r.zcard(keys.hold(key_id)),
            "bulk_running": r.hget(keys.BULK_KEY_RUNNING, key_id)}


NOTHING = {"slots": 0, "pending": None, "held_bulks": 0, "bulk_running": None}


class BulkClient(Client):
    """A client that also treats ``bulk_done`` as the end of a log."""

    def finish(self, job_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        open_logs = set(job_ids) - {f.get("job_id") for f in self.frames
                                    if f.get("type") in ("done", "error", "bulk_done")}
        while open_logs:
            frame = self.recv()
            if frame.get("type") in ("done", "error", "bulk_done"):
                open_logs.discard(frame.get("job_id"))
        return self.events()


@pytest.fixture
def open_client() -> Iterator[Callable[[str, str], BulkClient]]:
    clients: list[BulkClient] = []

    def opener(url: str, key: str) -> BulkClient:
        c = BulkClient(url, key, timeout_s=30)
        clients.append(c)
        return c

    yield opener
    for c in clients:
        c.close()


def test_a_bulk_of_20_is_acked_once_and_each_item_streams_on_its_own(
        web: str, api_key: str, open_client: Callable[[str, str], BulkClient]) -> None:
    """One 'queued' lists 20 job ids; 20 gap-free streams with the exact text; bulk_done counts 20 done."""
    c = open_client(web, api_key)
    prompts = [f"bulk item {i}" for i in range(20)]
    c.send(type="bulk", ref="b1", items=[item(i, p) for i, p in enumerate(prompts)])
    queued = c.recv()
    assert queued["type"] == "queued" and queued["ref"] == "b1", queued
    assert [it["ref"] for it in queued["items"]] == list(range(20))
    job_ids = [it["job_id"] for it in queued["items"]]
    assert len(set(job_ids)) == 20 and queued["held"] == 20
    assert all(j.startswith(queued["bulk_id"]) for j in job_ids)
    logs = run_bulk(c, queued["log_id"], job_ids)
    assert [f["type"] for f in c.frames].count("queued") == 1
    for prompt, job_id in zip(prompts, job_ids, strict=True):
        log = logs[job_id]
        assert [f["seq"] for f in log] == list(range(len(log))), log
        assert log[-1]["type"] == "done"
        assert text_of(log) == expected(prompt)
    done = logs[queued["log_id"]][-1]
    assert done["type"] == "bulk_done"
    assert (done["status"], done["total"], done["done"], done["failed"], done["cancelled"]) \
        == ("completed", 20, 20, 0, 0)
    # Streams interleave: some item's events came between another item's.
    order = [f["job_id"] for f in c.frames if f.get("type") == "token"]
    assert any(order.index(j) < max(i for i, x in enumerate(order) if x == k)
               for j in job_ids for k in job_ids if j != k)


def test_invalid_items_get_their_own_errors_and_the_valid_ones_run(
        web: str, api_key: str, open_client: Callable[[str, str], BulkClient]) -> None:
    """Items with a bad model, no prompt, a session or a bad max_tokens fail alone; the rest stream."""
    c = open_client(web, api_key)
    items = [item(0, "good zero"), item(1, "bad model", model="gpt-9"), {"ref": 2},
             item(3, "good three"), item(4, "in a session", session="s"),
             item(5, "too long", max_tokens=10**9), "not an object", item(7, "good seven")]
    c.send(type="bulk", ref="mixed", items=items)
    queued = c.recv()
    assert queued["type"] == "queued", queued
    got = {it["ref"]: it for it in queued["items"]}
    assert [it.get("code") for it in queued["items"]] == [
        None, "unknown_model", "missing_field", None, "bad_field", "out_of_range", "bad_field",
        None]
    assert got[None]["message"].startswith("items[6] must be an object")
    job_ids = [got[i]["job_id"] for i in (0, 3, 7)]
    logs = run_bulk(c, queued["log_id"], job_ids)
    for i, job_id in zip((0, 3, 7), job_ids, strict=True):
        assert text_of(logs[job_id]) == expected(items[i]["prompt"])  # type: ignore[index]
    done = logs[queued["log_id"]][-1]
    assert (done["total"], done["done"]) == (3, 3)


def test_a_200_item_bulk_runs_within_5_slots_and_the_token_budget(
        big_web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """200 items, 5 jobs at once and 20,000 tokens/min from a bucket at 4,000: all done, never > 5
    running, never over budget (from the jobs' own times and usage), held positions count down."""
    raw, key = new_key(r, "bulk5")
    drained_ms = drain(admission, key, leave=4_000)
    # Each item needs ~41 tokens (a 37-token prompt, 4 out): the first ~100 run as
    # fast as 5 slots allow, the rest ~8 a second as the bucket refills.
    prompts = [f"x{i}" + " lorem" * 28 for i in range(200)]
    c = open_client(big_web, raw)
    c.send(type="bulk", ref="big", items=[item(i, p) for i, p in enumerate(prompts)])
    queued = c.recv()
    assert queued["type"] == "queued" and queued["held"] == 200, queued
    job_ids = [it["job_id"] for it in queued["items"]]
    logs = run_bulk(c, queued["log_id"], job_ids)
    done = logs[queued["log_id"]][-1]
    assert (done["type"], done["done"], done["failed"], done["cancelled"]) == \
        ("bulk_done", 200, 0, 0)
    runs, used = [], []
    for i, job_id in enumerate(job_ids):
        assert logs[job_id][-1]["type"] == "done" and text_of(logs[job_id]) == expected(prompts[i])
        created, started, finished = r.hmget(keys.job(job_id),
                                             ["created_ms", "started_ms", "finished_ms"])
        runs.append((int(started), int(finished)))  # type: ignore[arg-type]
        usage = logs[job_id][-1]["usage"]
        # What admission reserved (its own count), or what the job used if less: a job
        # that used more (the model counted its prompt higher) was charged the overage
        # when it settled, which later admissions then waited off.
        reserved = count_message_tokens([{"role": "user", "content": prompts[i]}], "mock-1") + 4
        charged = min(reserved, usage["prompt_tokens"] + usage["completion_tokens"])
        used.append((int(created), charged))  # type: ignore[arg-type]
    # At most 5 jobs ran at any instant (a job's run lies within its slot's hold).
    edges = sorted([(s, 1) for s, _ in runs] + [(f, -1) for _, f in runs],
                   key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert 1 < most <= 5  # the slots, not the bucket, held the first hundred
    # Never over budget: what jobs created by time t were charged came out of an
    # bucket of 4,000 refilling at 20,000/min since the drain.  (Without admission,
    # 200 items at 5 at a time would take ~8,200 tokens in a few seconds.)
    total = 0
    for created, tokens in sorted(used):
        total += tokens
        assert total <= 4_000 + 20_000 / 60_000 * (created - drained_ms) + 1, (created, total)
    # Held positions of the last item count down, frame after frame.
    held = [f for f in logs[queued["log_id"]] if f["type"] == "held"]
    last = [f["position"] + 199 - f["next_index"] for f in held]
    assert len(set(last)) > 2 and last == sorted(last, reverse=True), last
    assert leaks(r, key.key_id) == NOTHING


def test_cancel_by_bulk_id_ends_every_held_item_and_resume_reaches_a_held_item(
        web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """Held items (empty bucket): one cancelled by job id, another resumed from a second socket,
    then the bulk cancelled by its id: every item ends 'cancelled' and nothing is left."""
    raw, key = new_key(r, "tiny")  # 600 tokens/min, half for bulks: nothing starts for ~30 s
    drain(admission, key)
    c = open_client(web, raw)
    c.send(type="bulk", ref="cb", items=[item(i, f"cancel me {i}") for i in range(4)])
    queued = c.recv()
    job_ids = [it["job_id"] for it in queued["items"]]
    other = open_client(web, raw)
    other.send(type="resume", ref="r", job_id=job_ids[2], after=-1)
    other.send(type="cancel", ref="c0", job_id=job_ids[0])
    first = c.until(lambda f: f.get("job_id") == job_ids[0])
    assert (first["type"], first["code"]) == ("error", "cancelled")
    c.send(type="cancel", ref="cb", bulk_id=queued["bulk_id"])
    logs = run_bulk(c, queued["log_id"], job_ids)
    assert [logs[j][-1]["code"] for j in job_ids] == ["cancelled"] * 4
    done = logs[queued["log_id"]][-1]
    assert (done["status"], done["cancelled"], done["done"]) == ("cancelled", 4, 0)
    resumed = other.until(lambda f: f.get("job_id") == job_ids[2])
    assert (resumed["type"], resumed["code"], resumed["seq"]) == ("error", "cancelled", 0)
    assert not [f for f in other.frames if f.get("ref") == "r"]  # the resume was accepted
    assert leaks(r, key.key_id) == NOTHING
    # Another key cannot cancel it, nor tell it from a bulk that never existed.
    stranger = open_client(web, new_key(r, "tiny")[0])
    stranger.send(type="cancel", ref="x", bulk_id=queued["bulk_id"])
    assert stranger.recv()["code"] == "unknown_job"


@pytest.mark.parametrize("frame, code", [
    ({"type": "bulk", "ref": "f"}, "missing_field"),
    ({"type": "bulk", "ref": "f", "items": "one, two"}, "bad_field"),
    ({"type": "bulk", "ref": "f", "items": {"0": "x"}}, "bad_field"),
    ({"type": "bulk", "ref": "f", "items": []}, "bad_field"),
    ({"type": "bulk", "ref": "f", "items": [{}] * 251}, "too_many_items"),
    ({"type": "bulk", "ref": "f", "items": [{"prompt": ""}, 3]}, "bad_field"),
    ({"type": "cancel", "ref": "f", "bulk_id": "nope"}, "bad_field"),
])
def test_invalid_bulk_frames_get_clear_errors_and_leak_nothing(
        big_web: str, r: redis.Redis, open_client: Callable[[str, str], BulkClient],
        frame: dict[str, Any], code: str) -> None:
    """Bulk frames without a list of items, empty, too long or all invalid are refused whole."""
    raw, key = new_key(r, "unlimited")
    c = open_client(big_web, raw)
    c.ws.send(json.dumps(frame))
    error = c.recv()
    assert (error["type"], error["ref"], error["code"]) == ("error", "f", code), error
    assert error["message"]
    assert leaks(r, key.key_id) == NOTHING
    c.send(type="generate", ref="after", prompt="still served", max_tokens=3)
    queued = c.recv()
    assert queued["type"] == "queued"
    assert text_of(c.finish({queued["job_id"]})[queued["job_id"]]) == expected("still served", 3)


def test_a_held_generate_gets_held_frames_then_its_stream(
        web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """queue_instead_of_429: a generate an empty bucket refuses is held, told so, then run."""
    raw, key = new_key(r, "holds")  # 600 tokens/min: the ~14 tokens it needs refill in ~1.4 s
    drain(admission, key)
    c = open_client(web, raw)
    c.send(type="generate", ref="h", prompt="held then run", max_tokens=4)
    queued = c.recv()
    assert (queued["type"], queued["held"], queued["max_wait_s"]) == ("queued", True, 30)
    logs = run_bulk(c, queued["log_id"], [queued["job_id"]])
    job = logs[queued["job_id"]]
    assert job[-1]["type"] == "done" and text_of(job) == expected("held then run")
    held = [i for i, f in enumerate(c.frames) if f.get("type") == "held"]
    first_token = next(i for i, f in enumerate(c.frames) if f.get("type") == "token")
    assert held and held[0] < first_token
    assert c.frames[held[0]]["position"] == 0 and c.frames[held[0]]["held"] == 1
    assert not [f for f in c.frames if f.get("type") == "error"]
    assert leaks(r, key.key_id) == NOTHING


def test_a_held_generate_is_refused_after_the_wait_allowed(
        web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """Held past its tier's queue_max_wait_s (1 s), a generate ends with the usual rate_limited."""
    raw, key = new_key(r, "holds_briefly")  # ~75 tokens needed: 7.5 s of refill
    drain(admission, key)
    c = open_client(web, raw)
    c.send(type="generate", ref="h", prompt="held too long", max_tokens=64)
    queued = c.recv()
    assert queued["held"] is True
    logs = run_bulk(c, queued["log_id"], [queued["job_id"]])
    (error,) = logs[queued["job_id"]]
    assert (error["type"], error["code"]) == ("error", "rate_limited"), error
    assert "queue_max_wait_s" in error["message"]
    assert r.hget(keys.job(queued["job_id"]), "started_ms") is None
    assert leaks(r, key.key_id) == NOTHING


def test_a_client_gone_while_held_leaks_nothing(
        web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """A socket closed while its generate is held: the item is dropped, no slot, reservation or hold."""
    raw, key = new_key(r, "holds")  # ~75 tokens needed: held ~7.5 s
    drain(admission, key)
    c = open_client(web, raw)
    c.send(type="generate", ref="h", prompt="nobody waits for me", max_tokens=64)
    queued = c.recv()
    assert queued["held"] is True
    c.close()
    bulk = keys.bulk(queued["bulk_id"])
    # The socket's close, the pump's count-out and the item's final event all
    # come a moment later (longer on a loaded box; the event is written after
    # the bulk is marked): wait for them, then check everything.
    wait_for(lambda: r.hget(bulk, "cancelled") == b"1" and r.hget(bulk, "status") == b"completed"
             and r.hget(keys.job(queued["job_id"]), "status") is not None
             and leaks(r, key.key_id) == NOTHING, 20, "the held item to be dropped")
    assert r.hmget(bulk, ["status", "started"]) == [b"completed", b"0"]
    assert r.hget(keys.job(queued["job_id"]), "status") == b"cancelled"
    assert not r.exists(keys.reservation(queued["job_id"]))
    assert admission.usage(key.key_id, 1)[0].requests == 1  # the drain's; none other admitted


def test_a_bulk_beyond_the_sockets_follows_is_refused_whole(
        big_web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """With 251 of 300 follows used, a 50-item bulk gets follow_limit and holds nothing."""
    raw, key = new_key(r, "tiny")  # an empty bucket: nothing starts for ~30 s
    drain(admission, key)
    c = open_client(big_web, raw)
    c.send(type="bulk", ref="first", items=[item(i, f"f{i}") for i in range(250)])
    first = c.recv()
    assert first["type"] == "queued" and first["held"] == 250
    c.send(type="bulk", ref="second", items=[item(i, f"s{i}") for i in range(50)])
    error = c.until(lambda f: f.get("ref") == "second")
    assert (error["type"], error["code"]) == ("error", "follow_limit"), error
    assert "251" in error["message"] and "300" in error["message"]
    assert (r.hget(keys.BULK_PENDING, key.key_id), r.zcard(keys.hold(key.key_id))) == (b"250", 1)
    c.send(type="cancel", ref="c", bulk_id=first["bulk_id"])
    done = c.until(lambda f: f.get("type") == "bulk_done")
    assert (done["cancelled"], done["total"]) == (250, 250)
    assert leaks(r, key.key_id) == NOTHING


def test_a_bulk_beyond_the_keys_pending_items_is_refused_whole(
        big_web: str, r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """With 250 of its 300 pending items held, a key's 60-item bulk (on another socket) gets
    too_many_pending and holds nothing; a 50-item one still fits."""
    raw, key = new_key(r, "tiny")  # an empty bucket: nothing starts for ~30 s
    drain(admission, key)
    c, other = open_client(big_web, raw), open_client(big_web, raw)
    c.send(type="bulk", ref="first", items=[item(i, f"f{i}") for i in range(250)])
    first = c.recv()
    assert first["held"] == 250
    other.send(type="bulk", ref="more", items=[item(i, f"m{i}") for i in range(60)])
    error = other.recv()
    assert (error["type"], error["ref"], error["code"]) == ("error", "more", "too_many_pending")
    assert (r.hget(keys.BULK_PENDING, key.key_id), r.zcard(keys.hold(key.key_id))) == (b"250", 1)
    other.send(type="bulk", ref="fits", items=[item(i, f"m{i}") for i in range(50)])
    fits = other.recv()
    assert (fits["type"], fits["held"]) == ("queued", 50)
    for client, queued in ((c, first), (other, fits)):
        client.send(type="cancel", ref="c", bulk_id=queued["bulk_id"])
        assert client.until(lambda f: f.get("type") == "bulk_done")["status"] == "cancelled"
    assert leaks(r, key.key_id) == NOTHING


def test_a_socket_that_cancels_on_disconnect_cancels_its_bulks(
        start_proc: Callable[..., Proc], sluice_env: dict[str, str], worker: Proc,
        r: redis.Redis, admission: Admission,
        open_client: Callable[[str, str], BulkClient]) -> None:
    """With SLUICE_CANCEL_ON_DISCONNECT=1, a socket's held bulk is cancelled when it closes."""
    web = start_web(start_proc, {**sluice_env, "SLUICE_CANCEL_ON_DISCONNECT": "1"})
    raw, key = new_key(r, "tiny")  # an empty bucket: nothing starts for ~30 s
    drain(admission, key)
    c = open_client(web, raw)
    c.send(type="bulk", ref="b", items=[item(i, f"gone {i}") for i in range(3)])
    queued = c.recv()
    assert queued["held"] == 3
    c.close()
    bulk = keys.bulk(queued["bulk_id"])
    wait_for(lambda: r.hget(bulk, "status") == b"cancelled", 10, "the bulk to be cancelled")
    assert r.hmget(bulk, ["cancelled", "started"]) == [b"3", b"0"]
    assert leaks(r, key.key_id) == NOTHING


# -- the same hold on the HTTP API -----------------------------------------------------------


def sdk(ws_url: str, raw: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=ws_url.replace("ws://", "http://").replace("/ws", "/v1"),
                         api_key=raw, max_retries=0)


def test_a_held_http_request_waits_then_completes(
        web: str, r: redis.Redis, admission: Admission) -> None:
    """queue_instead_of_429 on the HTTP API: refused requests are held, then answered in full (streamed or not)."""
    for stream in (False, True):
        raw, key = new_key(r, "holds")  # 600 tokens/min: the ~14 tokens it needs refill in ~1.4 s
        drain(admission, key)
        prompt = f"held over http, stream={stream}"
        with sdk(web, raw) as client:
            if stream:
                chunks = client.chat.completions.create(
                    model="mock-1", messages=[{"role": "user", "content": prompt}],
                    max_tokens=4, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = client.chat.completions.create(
                    model="mock-1", messages=[{"role": "user", "content": prompt}],
                    max_tokens=4).choices[0].message.content or ""
        assert text == expected(prompt)
        # The pump counts an item out once it sees it end.
        wait_for(lambda k=key.key_id: leaks(r, k) == NOTHING, 10,  # type: ignore[misc]
                 "the held item to be counted out")
        usage = admission.usage(key.key_id, 1)[0]
        assert usage.requests == 2 and usage.rejected >= 1  # the drain's, then the held one's


def test_a_held_http_request_past_its_wait_gets_429(
        web: str, r: redis.Redis, admission: Admission) -> None:
    """Held past its tier's queue_max_wait_s, an HTTP request gets the SDK's RateLimitError."""
    raw, key = new_key(r, "holds_briefly")  # ~75 tokens needed: 7.5 s of refill, 1 s allowed
    drain(admission, key)
    with sdk(web, raw) as client, pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(
            model="mock-1", messages=[{"role": "user", "content": "held too long"}],
            max_tokens=64)
    assert "queue_max_wait_s" in e.value.message
    wait_for(lambda: leaks(r, key.key_id) == NOTHING, 10, "the held item to be counted out")


def test_an_http_client_gone_while_held_leaks_nothing(
        web: str, r: redis.Redis, admission: Admission) -> None:
    """A streaming HTTP request closed while held: its item is dropped, nothing is left."""
    raw, key = new_key(r, "holds")  # ~75 tokens needed: held ~7.5 s
    drain(admission, key)
    before = set(r.scan_iter(match=keys.bulk("*"), count=1000))
    with sdk(web, raw) as client:
        stream = client.chat.completions.create(
            model="mock-1", messages=[{"role": "user", "content": "nobody waits for me"}],
            max_tokens=64, stream=True)
        stream.close()
    found: list[bytes] = []

    def dropped() -> bool:
        found[:] = [b for b in set(r.scan_iter(match=keys.bulk("*"), count=1000)) - before
                    if r.type(b) == b"hash" and r.hget(b, "owner") == key.key_id.encode()]
        return bool(found) and all(r.hget(b, "cancelled") == b"1" for b in found)
    wait_for(dropped, 10, "the held item to be dropped")
    assert [r.hget(b, "started") for b in found] == [b"0"]
    wait_for(lambda: leaks(r, key.key_id) == NOTHING, 10, "the held item to be counted out")
    assert admission.usage(key.key_id, 1)[0].requests == 1  # the drain's; none other admitted
