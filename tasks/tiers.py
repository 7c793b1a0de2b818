"""Rate-limit tiers: what an API key may use, read from a TOML file.

The file named by ``SLUICE_TIERS_FILE`` (``Settings.tiers_file``) holds one table per tier; every
field is optional and falls back to the built-in tier of the same name, or,
for a new tier, to ``free``::

    [tiers.pro]
    tokens_per_minute = 200_000     # bucket size; refills continuously at 1/60 per second
    requests_per_minute = 600
    max_concurrent_jobs = 16
    max_prompt_tokens = 32_000
    max_output_tokens = 4_096
    default_output_tokens = 1_024   # reserved when a request gives no max_tokens
    models = ["*"]                  # or a list of model names
    queue_instead_of_429 = false    # hold a generate the buckets refuse, instead of 429
    queue_max_wait_s = 60           # ... for at most this long, then refuse it
    batch_share = 0.5               # of the buckets and slots that bulk and batch items may use

Without a file, :data:`DEFAULT_TIERS` apply.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tasks.limits import Rates

ALL_MODELS = "*"


class TierConfigError(ValueError):
    """The tiers file cannot be read or holds a bad value."""


@dataclass(frozen=True)
class Tier:
    """The limits of every API key of one tier."""

    name: str
    tokens_per_minute: int
    requests_per_minute: int
    max_concurrent_jobs: int
    max_prompt_tokens: int
    max_output_tokens: int
    default_output_tokens: int
    #: Model names the tier may use; ``("*",)`` allows every model.
    models: tuple[str, ...] = (ALL_MODELS,)
    #: Hold a request that does not fit the bucket instead of answering ``rate_limited``.
    queue_instead_of_429: bool = False
    #: How long such a request is held at most; then it gets ``rate_limited`` after all.
    queue_max_wait_s: int = 60
    #: The share (0 < share <= 1) of the key's token and request buckets and of its
    #: concurrency that bulk and batch items may use; the rest is kept for
    #: interactive requests (see :meth:`tasks.admission.Admission.admit`).
    batch_share: float = 0.5

    @property
    def batch_slots(self) -> int:
        """How many bulk and batch items of one key may run at once (at least one)."""
        return max(1, math.floor(self.batch_share * self.max_concurrent_jobs))

    @property
    def rates(self) -> Rates:
        """The figures the Redis buckets enforce."""
        return Rates(self.tokens_per_minute, self.requests_per_minute, self.max_concurrent_jobs)

    def allows(self, model: str) -> bool:
        """Whether keys of this tier may use ``model``."""
        return ALL_MODELS in self.models or model in self.models


DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier("free", tokens_per_minute=20_000, requests_per_minute=60,
                 max_concurrent_jobs=4, max_prompt_tokens=4_000, max_output_tokens=1_024,
                 default_output_tokens=256),
    "pro": Tier("pro", tokens_per_minute=200_000, requests_per_minute=600,
                max_concurrent_jobs=32, max_prompt_tokens=32_000, max_output_tokens=4_096,
                default_output_tokens=1_024),
    "unlimited": Tier("unlimited", tokens_per_minute=1_000_000_000,
                      requests_per_minute=1_000_000, max_concurrent_jobs=100_000,
                      max_prompt_tokens=1_000_000, max_output_tokens=100_000,
                      default_output_tokens=4_096),
}

_COUNTS = ("tokens_per_minute", "requests_per_minute", "max_concurrent_jobs",
           "max_prompt_tokens", "max_output_tokens", "default_output_tokens",
           "queue_max_wait_s")


def load_tiers(path: str | Path | None = None) -> dict[str, Tier]:
    """Read the tiers from ``path`` (``Settings.tiers_file``), or the defaults without one.

    :param path: a TOML file; ``None`` for the built-in tiers.
    :return: tiers by name, the built-in ones included unless the file redefines them.
    :raises TierConfigError: the file is missing, is not TOML, or holds a bad value.

    Example::

        tiers = load_tiers(Settings.from_env().tiers_file or None)
        tiers["pro"].tokens_per_minute
    """
    if path is None:
        return dict(DEFAULT_TIERS)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TierConfigError(f"cannot read tiers file {str(path)!r}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise TierConfigError(f"tiers file {str(path)!r} is not valid TOML: {e}") from e
    return parse_tiers(data, source=str(path))


def parse_tiers(data: Mapping[str, Any], source: str = "<tiers>") -> dict[str, Tier]:
    """Validate parsed TOML into tiers, on top of the built-in ones.

    :param data: the document, with a ``tiers`` table of tables.
    :param source: where it came from, for error messages.
    :return: tiers by name.
    :raises TierConfigError: a value is missing, of the wrong type, or out of range.
    """
    extra = set(data) - {"tiers"}
    if extra:
        raise TierConfigError(f"{source}: unknown top-level key {sorted(extra)[0]!r}; "
                              "expected only [tiers.<name>] tables")
    tables = data.get("tiers", {})
    if not isinstance(tables, dict):
        raise TierConfigError(f"{source}: 'tiers' must be a table of tiers")
    tiers = dict(DEFAULT_TIERS)
    for name, table in tables.items():
        tiers[name] = _tier(name, table, f"{source}: tiers.{name}")
    return tiers


def _tier(name: str, table: Any, where: str) -> Tier:
    if not isinstance(table, dict):
        raise TierConfigError(f"{where} must be a table, got {table!r}")
    known = {f.name for f in fields(Tier)} - {"name"}
    unknown = set(table) - known
    if unknown:
        raise TierConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}; expected "
                              f"one of {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TierConfigError(f"{where}.{key} must be a positive integer, got {value!r}")
        elif key == "models":
            if isinstance(value, str):
                value = [value]
            if not (isinstance(value, list) and value
                    and all(isinstance(m, str) and m for m in value)):
                raise TierConfigError(f"{where}.models must be a non-empty list of model "
                                      f"names (or \"*\"), got {value!r}")
            value = tuple(value)
        elif key == "batch_share":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value <= 1:
                raise TierConfigError(f"{where}.batch_share must be a number within (0, 1], "
                                      f"got {value!r}")
            value = float(value)
        elif not isinstance(value, bool):
            raise TierConfigError(f"{where}.{key} must be true or false, got {value!r}")
        values[key] = value
    tier = replace(DEFAULT_TIERS.get(name, DEFAULT_TIERS["free"]), name=name, **values)
    if tier.default_output_tokens > tier.max_output_tokens:
        raise TierConfigError(f"{where}.default_output_tokens ({tier.default_output_tokens}) "
                              f"exceeds max_output_tokens ({tier.max_output_tokens})")
    return tier
