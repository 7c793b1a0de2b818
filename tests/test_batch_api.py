"""The Batch API through the real openai SDK, against the session's front end and workers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
import redis

from app.apikeys import KeyStore
from app.cli.dev.mockllm import MockConfig, expected_text
from tasks import keys
from tasks.bulk_store import BulkStore
from tests.conftest import MOCK, Proc, start_worker, wait_for

FINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def base_url(web: str) -> str:
    return web.replace("ws://", "http://").removesuffix("/ws") + "/v1"


@pytest.fixture
def sdk(base_url: str, r: redis.Redis) -> Callable[[str], openai.OpenAI]:
    """An openai SDK client for a fresh key of the given tier."""
    def make(tier: str = "unlimited") -> openai.OpenAI:
        raw = KeyStore(r).create("batch-test", tier)[0]
        return openai.OpenAI(base_url=base_url, api_key=raw, max_retries=0, timeout=30)
    return make


def line(i: int, prompt: str | None = None, max_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    body = {"model": "mock-1", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt or f"prompt {i}"}]}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": body, **extra}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n"
                    for x in lines)


def submit(client: openai.OpenAI, content: bytes, **kw: Any) -> Any:
    upload = client.files.create(file=("input.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", **kw)


def finish(client: openai.OpenAI, batch_id: str, timeout_s: float = 40) -> Any:
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b,
                    timeout_s, f"batch {batch_id} to end")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_500_request_batch_completes_through_the_openai_sdk(sdk: Callable[..., openai.OpenAI]
                                                              ) -> None:
    """files.create + batches.create: 500 requests complete, one output line per custom_id, the mock's texts."""
    client = sdk()
    batch = submit(client, jsonl([line(i) for i in range(500)]), metadata={"job": "nightly"})
    assert batch.status == "in_progress" and batch.metadata == {"job": "nightly"}
    batch = finish(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 500, "completed": 500, "failed": 0}
    assert batch.error_file_id is None and batch.completed_at is not None
    out = lines_of(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(500))
    config = MockConfig(**MOCK)
    for o in out:
        i = int(o["custom_id"].split("-")[1])
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
        messages = [{"role": "user", "content": f"prompt {i}"}]
        assert body["choices"][0]["message"]["content"] == expected_text(messages, 3, config)
    assert batch.id in [b.id for b in client.batches.list(limit=5)]
    assert client.files.retrieve(batch.output_file_id).bytes > 0


def test_bad_lines_are_reported_by_line_and_the_others_run(sdk: Callable[..., openai.OpenAI]
                                                           ) -> None:
    """3 bad lines among 100: 97 results, 3 errors naming lines 10, 50 and 90; the file does not fail."""
    client = sdk()
    lines: list[Any] = [line(i) for i in range(100)]
    lines[9] = b'{"custom_id": "req-9", "method": "POST", oops'
    lines[49] = line(49, url="/v1/embeddings")
    lines[89] = line(89, max_tokens=-5)
    batch = finish(client, submit(client, jsonl(lines)).id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 100, "completed": 97, "failed": 3}
    assert batch.errors is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (10, "invalid_json"), (50, "invalid_url"), (90, "out_of_range")]
    assert len(lines_of(client, batch.output_file_id)) == 97
    errors = lines_of(client, batch.error_file_id)
    assert sorted(str(e["custom_id"]) for e in errors) == ["None", "req-49", "req-89"]
    assert all(e["response"] is None and e["error"]["code"] for e in errors)


@pytest.mark.parametrize(("content", "code"), [
    (b"name,prompt\nalice,hello\n", "invalid_file"),
    (jsonl([line(1), line(2), line(1)]), "duplicate_custom_id"),
])
def test_a_file_that_is_not_jsonl_or_repeats_a_custom_id_fails_with_its_reason(
        sdk: Callable[..., openai.OpenAI], content: bytes, code: str) -> None:
    """Not JSONL, or a custom_id used twice: the batch fails as a whole and says why."""
    client = sdk()
    batch = submit(client, content)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data[0].code == code
    if code == "duplicate_custom_id":
        assert "lines 1 and 3" in (batch.errors.data[0].message or "")


def test_a_file_too_large_is_refused_at_upload(sdk: Callable[..., openai.OpenAI]) -> None:
    """A file over SLUICE_BATCH_MAX_FILE_BYTES (200,000 in the tests) is refused with 413 naming the limit."""
    client = sdk()
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * 250_000), purpose="batch")
    assert e.value.status_code == 413 and "200000" in e.value.message


def test_another_key_cannot_read_or_cancel_a_batch(sdk: Callable[..., openai.OpenAI]) -> None:
    """Another key gets 404 for the batch, its input and output files, and its cancel; its list is empty."""
    owner, other = sdk(), sdk()
    batch = finish(owner, submit(owner, jsonl([line(i) for i in range(3)])).id)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    for file_id in (batch.input_file_id, batch.output_file_id):
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(file_id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(file_id)
    assert list(other.batches.list()) == []
    assert owner.batches.retrieve(batch.id).status == "completed"


def test_cancel_mid_way_stops_new_starts_and_keeps_finished_results(
        sdk: Callable[..., openai.OpenAI], r: redis.Redis) -> None:
    """Cancel after 10 of 200 done: nothing more starts, status ends cancelled, every request in one file once."""
    client = sdk("bulk5")  # 5 at once: 200 requests take seconds
    batch = submit(client, jsonl([line(i, max_tokens=12) for i in range(200)]))
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, 30,
             "10 requests done")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    store = BulkStore(r, 60)
    bulk_id = batch.id.removeprefix("batch_")
    started = store.get(bulk_id).started  # type: ignore[union-attr]
    batch = finish(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert store.get(bulk_id).started == started < 200  # type: ignore[union-attr]
    out, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert len(out) == batch.request_counts.completed >= 10
    ids = [o["custom_id"] for o in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(200))
    assert {e["error"]["code"] for e in errors} <= {"batch_cancelled"}
    owner = store.get(bulk_id).owner  # type: ignore[union-attr]
    assert r.hget(keys.BULK_PENDING, owner) is None and not r.exists(keys.hold(owner))
    assert r.zcard(keys.slots(owner)) == 0  # every started item settled its slot
    assert not any(r.exists(keys.reservation(f"{bulk_id}{i:08x}")) for i in range(200))


def test_every_request_ends_once_when_a_worker_is_killed_mid_batch(
        sdk: Callable[..., openai.OpenAI], r: redis.Redis, start_proc: Callable[..., Proc],
        sluice_env: dict[str, str]) -> None:
    """kill -9 the worker that pumps and runs items: the batch completes, each request once."""
    pump_before = r.get(keys.PUMP)
    extra = start_worker(start_proc, sluice_env, name="doomed")
    wait_for(lambda: r.get(keys.PUMP) != pump_before, 10, "the new worker to take the pump")
    client = sdk("bulk5")
    batch = submit(client, jsonl([line(i, max_tokens=12) for i in range(60)]))
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, 30,
             "10 requests done")
    extra.kill()
    batch = finish(client, batch.id, timeout_s=60)
    assert batch.status == "completed"
    out, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    ids = [o["custom_id"] for o in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(60)) and len(ids) == 60
    assert batch.request_counts.completed + batch.request_counts.failed == 60
    assert r.get(keys.PUMP) == pump_before  # the surviving worker took the pump back
