"""Bad input never crashes anything: an error frame with a stable code, and the socket stays open."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import websocket

from app.cli.dev.mockllm import MockConfig, expected_text
from app.protocol import Bulk, Cancel, Generate, ProtocolError, parse
from tasks.config import Settings
from tests.conftest import Client, text_of

SETTINGS = Settings()

BAD_FRAMES: list[tuple[str, str, str]] = [
    ("malformed json", "{not json", "bad_json"),
    ("not an object", "[1, 2]", "bad_frame"),
    ("unknown type", '{"type": "dance"}', "unknown_type"),
    ("missing type", '{"prompt": "hi"}', "unknown_type"),
    ("no prompt nor messages", '{"type": "generate"}', "missing_field"),
    ("both prompt and messages",
     '{"type": "generate", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
     "missing_field"),
    ("prompt not a string", '{"type": "generate", "prompt": 5}', "bad_field"),
    ("empty prompt", '{"type": "generate", "prompt": ""}', "bad_field"),
    ("bad message role", '{"type": "generate", "messages": [{"role": "god", "content": "x"}]}',
     "bad_field"),
    ("max_tokens a string", '{"type": "generate", "prompt": "a", "max_tokens": "10"}', "bad_field"),
    ("max_tokens zero", '{"type": "generate", "prompt": "a", "max_tokens": 0}', "out_of_range"),
    ("max_tokens huge", '{"type": "generate", "prompt": "a", "max_tokens": 100000000}',
     "out_of_range"),
    ("temperature out of range", '{"type": "generate", "prompt": "a", "temperature": 9}',
     "out_of_range"),
    ("unknown model", '{"type": "generate", "prompt": "a", "model": "gpt-17"}', "unknown_model"),
    ("model not a string", '{"type": "generate", "prompt": "a", "model": 3}', "bad_field"),
    ("session not a string", '{"type": "generate", "prompt": "a", "session": 1}', "bad_field"),
    ("resume without job_id", '{"type": "resume"}', "missing_field"),
    ("resume malformed job_id", '{"type": "resume", "job_id": "../../etc"}', "bad_field"),
    ("resume unknown job", '{"type": "resume", "job_id": "' + "0" * 32 + '"}', "unknown_job"),
    ("resume after negative", '{"type": "resume", "job_id": "' + "0" * 32 + '", "after": -5}',
     "out_of_range"),
    ("cancel unknown job", '{"type": "cancel", "job_id": "' + "f" * 32 + '"}', "unknown_job"),
    ("ref an object", '{"type": "generate", "prompt": "a", "ref": {}}', "bad_field"),
]


@pytest.mark.parametrize(("case", "text", "code"), BAD_FRAMES, ids=[c for c, _, _ in BAD_FRAMES])
def test_bad_frame_gets_error_and_socket_stays_open(web: str, connect: Callable[[str], Client],
                                                    case: str, text: str, code: str) -> None:
    """Each bad frame gets an error frame with its stable code; the socket then still works."""
    c = connect(web)
    c.ws.send(text)
    err = c.recv()
    assert err["type"] == "error" and err["code"] == code, err
    assert err["message"]
    c.send(type="generate", prompt="still alive", max_tokens=3)
    job_id = c.until(lambda f: f.get("type") == "queued")["job_id"]
    assert c.finish({job_id})[job_id][-1]["type"] == "done"


def test_bad_frames_do_not_disturb_a_running_job(web: str, connect: Callable[[str], Client]) -> None:
    """A job in flight completes, whole and in order, while garbage arrives on the same socket."""
    c = connect(web)
    c.send(type="generate", ref="keep", prompt="keep going", max_tokens=10)
    job_id = c.recv()["job_id"]
    for text, _, _ in [(t, None, None) for _, t, _ in BAD_FRAMES]:
        c.ws.send(text)
    c.ws.send_binary(b"\x00\x01binary")
    ev = c.finish({job_id})[job_id]
    assert [e["seq"] for e in ev] == list(range(len(ev)))
    assert text_of(ev) == expected_text("keep going", 10, MockConfig(ttft_ms=40, itl_ms=15,
                                                                     output_tokens=12))
    errors = [f for f in c.frames if f["type"] == "error" and "seq" not in f]
    assert len(errors) == len(BAD_FRAMES) + 1


def test_oversized_frame_closes_with_1009(web: str) -> None:
    """A frame over the configured size (3000 bytes in these tests) closes the socket with 1009."""
    ws = websocket.create_connection(web, timeout=10)
    try:
        # Small enough to arrive in one read: a server that closes with unread
        # input resets the connection, which can swallow the close frame.
        ws.send(json.dumps({"type": "generate", "prompt": "x" * 3_500}))
        opcode, frame = ws.recv_data_frame(control_frame=True)
        while opcode != websocket.ABNF.OPCODE_CLOSE:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        assert int.from_bytes(frame.data[:2], "big") == 1009
    finally:
        ws.shutdown()  # close() skips the socket once the peer has closed


def test_messages_form_and_ref_echo(web: str, connect: Callable[[str], Client]) -> None:
    """OpenAI-style messages are accepted and the client's ref is echoed in queued."""
    c = connect(web)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "hi"}]
    c.send(type="generate", ref=42, messages=msgs, max_tokens=4)
    q = c.recv()
    assert q["type"] == "queued" and q["ref"] == 42
    ev = c.finish({q["job_id"]})[q["job_id"]]
    assert text_of(ev) == expected_text(msgs, 4, MockConfig(ttft_ms=40, itl_ms=15, output_tokens=12))


def test_resume_beyond_the_end_is_out_of_range(web: str, connect: Callable[..., Client]) -> None:
    """Resuming after the last event of an ended job, or past any event, says so instead of hanging."""
    c = connect(web)
    c.send(type="generate", prompt="short", max_tokens=2)
    job_id = c.recv()["job_id"]
    last = c.finish({job_id})[job_id][-1]["seq"]
    for after in (last, last + 5):
        c.send(type="resume", ref=after, job_id=job_id, after=after)
        err = c.until(lambda f, a=after: f.get("ref") == a)
        assert err["type"] == "error" and err["code"] == "out_of_range", err
    c.send(type="resume", ref="ok", job_id=job_id, after=last - 1)
    assert c.until(lambda f: f.get("type") == "done")["seq"] == last


def test_a_bulk_frame_keeps_each_items_error_in_its_place() -> None:
    """Each item is validated as a generate; a bad one is kept as its error, with its ref."""
    req = parse(json.dumps({"type": "bulk", "ref": "b", "items": [
        {"ref": 1, "prompt": "ok"}, {"ref": 2, "prompt": "x", "max_tokens": 0},
        {"ref": {}, "prompt": "bad ref"}, 7]}), SETTINGS)
    assert isinstance(req, Bulk) and req.ref == "b"
    first, second, third, fourth = req.items
    assert isinstance(first, Generate) and first.ref == 1
    assert isinstance(second, ProtocolError) and (second.code, second.ref) == ("out_of_range", 2)
    assert isinstance(third, ProtocolError) and third.ref is None and "items[2].ref" in third.message
    assert isinstance(fourth, ProtocolError) and "items[3] must be an object" in fourth.message


@pytest.mark.parametrize(("items", "code"), [
    (None, "missing_field"), ("x", "bad_field"), ([], "bad_field"),
    ([{"prompt": "p"}] * 1001, "too_many_items"),
])
def test_a_bulk_frame_without_a_good_list_of_items_is_refused(items: Any, code: str) -> None:
    """'items' must be a non-empty list of at most bulk_max_items."""
    frame = {"type": "bulk", "ref": 9} if items is None else {"type": "bulk", "ref": 9,
                                                              "items": items}
    with pytest.raises(ProtocolError) as info:
        parse(json.dumps(frame), SETTINGS)
    assert (info.value.code, info.value.ref) == (code, 9)


def test_cancel_takes_a_bulk_id_or_a_job_id() -> None:
    """A cancel names a job (32 hex digits) or a bulk (24), not both."""
    assert parse('{"type": "cancel", "bulk_id": "' + "a" * 24 + '"}', SETTINGS) == \
        Cancel(None, None, "a" * 24)
    for frame in ('{"type": "cancel", "bulk_id": "' + "a" * 32 + '"}',
                  '{"type": "cancel", "bulk_id": "' + "a" * 24 + '", "job_id": "x"}'):
        with pytest.raises(ProtocolError):
            parse(frame, SETTINGS)
