"""Rate-limit tiers, as the front end imports them; they live in :mod:`tasks.tiers`."""

from __future__ import annotations

from tasks.tiers import (
    ALL_MODELS,
    DEFAULT_TIERS,
    Tier,
    TierConfigError,
    load_tiers,
    parse_tiers,
)

__all__ = ["ALL_MODELS", "DEFAULT_TIERS", "Tier", "TierConfigError", "load_tiers", "parse_tiers"]
