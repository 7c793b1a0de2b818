"""``sluice keys`` and ``sluice usage`` against the test redis-server, through click's runner."""

from __future__ import annotations

import json

import pytest
import redis
from click.testing import CliRunner, Result

from app.admission import Admission
from app.apikeys import KeyStore
from app.cli.dev.redis_server import RedisServer
from app.cli.keys import keys, usage
from app.tiers import DEFAULT_TIERS
from tasks.jobs import JobSpec


@pytest.fixture
def runner(redis_server: RedisServer) -> CliRunner:
    return CliRunner(env={"REDIS_URL": redis_server.url, "SLUICE_TIERS_FILE": ""})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def test_create_prints_the_key_once_and_lists_only_its_id(runner: CliRunner,
                                                          r: redis.Redis) -> None:
    """create prints a working key; list, show and revoke never print it again."""
    created = ok(runner.invoke(keys, ["create", "--tier", "pro", "--name", "alice"]))
    raw = created.stdout.strip()
    info = KeyStore(r).verify(raw)
    assert info is not None and (info.name, info.tier) == ("alice", "pro")
    listed = ok(runner.invoke(keys, ["list"])).output
    shown = ok(runner.invoke(keys, ["show", info.key_id, "--json"])).output
    assert info.key_id in listed and raw not in listed and raw not in shown
    assert json.loads(shown)["state"] == "active"
    assert "revoked" in ok(runner.invoke(keys, ["revoke", info.key_id])).output
    assert KeyStore(r).verify(raw) is None


def test_unknown_tier_and_id_are_refused(runner: CliRunner) -> None:
    """create with an unknown tier, and show/revoke of an unknown id, fail naming the value."""
    bad_tier = runner.invoke(keys, ["create", "--tier", "gold", "--name", "x"])
    assert bad_tier.exit_code != 0 and "unknown tier 'gold'" in bad_tier.output
    for command in ("show", "revoke"):
        missing = runner.invoke(keys, [command, "0" * 16])
        assert missing.exit_code == 1 and f"no API key with id '{'0' * 16}'" in missing.output


def test_usage_reports_requests_and_tokens(runner: CliRunner, r: redis.Redis) -> None:
    """usage shows today's admitted requests and the tokens settled jobs used."""
    _, info = KeyStore(r).create("carol", "free")
    adm = Admission(r, DEFAULT_TIERS, job_ttl_s=60, slot_ttl_s=60)
    job = adm.admit(info, JobSpec("mock-1", [{"role": "user", "content": "hi"}], 20))
    adm.settle(job.job_id, prompt_tokens=8, completion_tokens=12)
    out = ok(runner.invoke(usage, [info.key_id, "--days", "1", "--json"])).output
    today = json.loads(out.splitlines()[0])
    assert (today["requests"], today["prompt_tokens"], today["completion_tokens"]) == (1, 8, 12)
    table = ok(runner.invoke(usage, [info.key_id])).output
    assert len(table.splitlines()) == 8 and table.splitlines()[1].split()[1:] == [
        "1", "0", "8", "12", "20"]
