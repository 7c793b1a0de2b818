"""The streaming pipeline end to end: socket → Celery → worker → event log → socket."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Client, text_of
from workers.mockllm import MockConfig, expected_text

MOCK_CONFIG = MockConfig(ttft_ms=40, itl_ms=15, output_tokens=12)


def test_one_job_streams_queued_then_contiguous_tokens(web: str, connect: Callable[[str], Client]) -> None:
    """queued comes first, seq is 0..n with no gap, text is the mock's, done has usage and metrics."""
    c = connect(web)
    c.send(type="generate", ref="a", prompt="hello there", max_tokens=8)
    queued = c.recv()
    assert queued["type"] == "queued" and queued["ref"] == "a"
    job_id = queued["job_id"]
    events = c.finish({job_id})[job_id]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert text_of(events) == expected_text("hello there", 8, MOCK_CONFIG)
    done = events[-1]
    assert done["type"] == "done"
    assert done["usage"]["completion_tokens"] == 8
    assert done["usage"]["prompt_tokens"] > 0
    assert done["metrics"]["queue_wait_ms"] >= 0
    assert done["metrics"]["provider_ttft_ms"] >= 30
    assert done["metrics"]["tpot_ms"] > 0
