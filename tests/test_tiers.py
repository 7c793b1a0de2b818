"""Tiers load from a TOML file, fall back to built-in defaults, and name any bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.tiers import DEFAULT_TIERS, TierConfigError, load_tiers
from tasks.config import Settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    """With no SLUICE_TIERS_FILE the built-in free, pro and unlimited tiers apply."""
    tiers = load_tiers()
    assert set(tiers) >= {"free", "pro", "unlimited"} and tiers == DEFAULT_TIERS


def test_file_named_by_env_overrides_and_adds_tiers(tmp_path: Path) -> None:
    """A file overrides fields of built-in tiers and defines new ones on top of free."""
    path = write(tmp_path, """
[tiers.pro]
tokens_per_minute = 1_000
[tiers.team]
requests_per_minute = 5
models = ["mock-1"]
queue_instead_of_429 = true
queue_max_wait_s = 15
""")
    tiers = load_tiers(Settings.from_env({"SLUICE_TIERS_FILE": str(path)}).tiers_file)
    assert tiers["pro"].tokens_per_minute == 1_000
    assert tiers["pro"].max_output_tokens == DEFAULT_TIERS["pro"].max_output_tokens
    team = tiers["team"]
    assert (team.requests_per_minute, team.queue_instead_of_429, team.queue_max_wait_s) == \
        (5, True, 15)
    assert team.allows("mock-1") and not team.allows("mock-2")
    assert team.tokens_per_minute == DEFAULT_TIERS["free"].tokens_per_minute
    assert tiers["free"].allows("anything")


@pytest.mark.parametrize(("text", "named"), [
    ("[tiers.pro]\ntokens_per_minute = '10k'", "tiers.pro.tokens_per_minute"),
    ("[tiers.pro]\nmax_concurrent_jobs = 0", "got 0"),
    ("[tiers.pro]\nmax_tokens = 5", "unknown setting 'max_tokens'"),
    ("[tiers.pro]\nmodels = []", "tiers.pro.models"),
    ("[tiers.pro]\nqueue_instead_of_429 = 'yes'", "got 'yes'"),
    ("[tiers.pro]\nqueue_max_wait_s = 0", "tiers.pro.queue_max_wait_s must be a positive"),
    ("[tiers.pro]\ndefault_output_tokens = 9_999", "default_output_tokens (9999)"),
    ("[tier.pro]\ntokens_per_minute = 5", "unknown top-level key 'tier'"),
    ("[tiers.pro\n", "not valid TOML"),
])
def test_bad_values_are_named(tmp_path: Path, text: str, named: str) -> None:
    """A bad file fails with an error naming the file, the setting and the value."""
    path = write(tmp_path, text)
    with pytest.raises(TierConfigError) as info:
        load_tiers(path)
    assert named in str(info.value) and str(path) in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A tiers file that does not exist is an error, not a silent fallback to defaults."""
    with pytest.raises(TierConfigError, match="cannot read tiers file"):
        load_tiers(tmp_path / "nope.toml")
