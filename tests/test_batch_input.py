"""Batch input files: OpenAI's request lines validated one by one, the file as a whole."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.batch_input import InputFileError, parse_input
from tasks.config import Settings

SETTINGS = Settings(models="mock-1,mock-2", batch_max_file_bytes=10_000, batch_max_items=5)
URL = "/v1/chat/completions"


def request(custom_id: str, **body: Any) -> bytes:
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": URL,
                       "body": body}).encode() + b"\n"


def test_openai_spellings_become_the_same_job_spec_as_a_generate() -> None:
    """Text parts are joined, max_completion_tokens wins, defaults apply; blank lines are skipped."""
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    parsed = parse_input(request("a", messages=[{"role": "user", "content": parts}],
                                 max_completion_tokens=7, max_tokens=99, temperature=0.5)
                         + b"\n" + request("b", model="mock-2"), URL, SETTINGS)
    assert parsed.errors == [] and parsed.lines == [1, 3]
    a, b = parsed.items
    assert a.ref == "a" and a.spec.messages == [{"role": "user", "content": "Hello there"}]
    assert (a.spec.max_tokens, a.max_tokens_given, a.spec.temperature) == (7, True, 0.5)
    assert b.spec.model == "mock-2" and not b.max_tokens_given


@pytest.mark.parametrize(("line", "code"), [
    (request("s", stream=True), "unsupported"),
    (request("n", n=2), "unsupported"),
    (request("m", model="gpt-9"), "unknown_model"),
    (request(""), "missing_custom_id"),
    (b'{"custom_id": "x", "method": "GET", "url": "' + URL.encode() + b'", "body": {}}\n',
     "invalid_method"),
    (b"[1, 2]\n", "invalid_request"),
])
def test_a_bad_line_is_reported_with_its_number_and_code(line: bytes, code: str) -> None:
    """Each kind of bad line gets its own stable code and its line number; the good line stays."""
    parsed = parse_input(request("ok") + line, URL, SETTINGS)
    assert [i.ref for i in parsed.items] == ["ok"]
    assert [(e.line, e.code) for e in parsed.errors] == [(2, code)]
    assert parsed.total == 2


@pytest.mark.parametrize(("content", "code"), [
    (b"", "empty_file"),
    (b"\xff\xfe not utf-8", "invalid_file"),
    (b"not json\nnor this\n", "invalid_file"),
    (b"".join(request(str(i)) for i in range(6)), "too_many_items"),
    (b"x" * 10_001, "file_too_large"),
])
def test_a_file_that_cannot_be_a_batch_fails_as_a_whole(content: bytes, code: str) -> None:
    """Empty, not UTF-8, not JSONL at all, too many requests or too many bytes: one clear reason."""
    with pytest.raises(InputFileError) as e:
        parse_input(content, URL, SETTINGS)
    assert e.value.code == code
