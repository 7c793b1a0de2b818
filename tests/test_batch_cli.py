"""``sluice batch``: submit, follow, download and cancel over HTTP, against the session's front end."""

from __future__ import annotations

import json
from pathlib import Path

import redis
from click.testing import CliRunner

from app.apikeys import KeyStore
from app.cli.batch import batch


def test_submit_wait_status_results_and_cancel(web: str, r: redis.Redis, tmp_path: Path) -> None:
    """submit --wait draws progress and ends completed; results writes one line per request."""
    url = web.replace("ws://", "http://").removesuffix("/ws")
    env = {"SLUICE_API_KEY": KeyStore(r).create("cli", "unlimited")[0], "SLUICE_URL": url}
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "mock-1", "max_tokens": 2,
                       "messages": [{"role": "user", "content": f"cli {i}"}]}}
             for i in range(20)]
    lines[3]["method"] = "GET"
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    runner = CliRunner()
    submitted = runner.invoke(batch, ["submit", str(source), "--wait", "-m", "team=legal"],
                              env=env)
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.splitlines()[0]
    assert batch_id.startswith("batch_") and "completed, 19 completed, 1 failed" in submitted.stdout
    assert "line 4: invalid_method" in submitted.stderr and "done 19  failed 1" in submitted.stderr
    status = json.loads(runner.invoke(batch, ["status", batch_id], env=env).stdout)
    assert status["status"] == "completed" and status["request_counts"]["completed"] == 19
    out = tmp_path / "out.jsonl"
    got = runner.invoke(batch, ["results", batch_id, "-o", str(out)], env=env)
    assert got.exit_code == 0, got.output
    assert len(out.read_text().splitlines()) == 19
    assert json.loads(out.with_suffix(".errors.jsonl").read_text())["custom_id"] == "c3"
    refused = runner.invoke(batch, ["cancel", batch_id], env=env)
    assert refused.exit_code == 1 and "has completed" in refused.stderr
