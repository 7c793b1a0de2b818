"""A key's rate limits: what its tier allows, and where it stands now.

:class:`Rates` are the configured figures the Redis buckets enforce;
:class:`Limits` is a snapshot of a key's buckets, rendered as OpenAI's
``x-ratelimit-*`` headers or as the ``limits`` field of ``queued`` frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Rates:
    """The limits of one API key, as its tier sets them."""

    tokens_per_minute: int
    requests_per_minute: int
    max_concurrent_jobs: int

    def args(self) -> list[str]:
        """Bucket capacities and per-second refill rates, as the scripts take them."""
        return [str(self.tokens_per_minute), repr(self.tokens_per_minute / 60),
                str(self.requests_per_minute), repr(self.requests_per_minute / 60)]


@dataclass(frozen=True)
class Limits:
    """Where a key stands: the figures of OpenAI's ``x-ratelimit-*`` headers."""

    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float
    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_concurrent_jobs: int
    active_jobs: int

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` response headers (durations as ``1s``, ``6m0s``, ``20ms``)."""
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining_requests)),
            "x-ratelimit-remaining-tokens": str(max(0, self.remaining_tokens)),
            "x-ratelimit-reset-requests": duration(self.reset_requests_s),
            "x-ratelimit-reset-tokens": duration(self.reset_tokens_s),
        }

    def as_dict(self) -> dict[str, int | float]:
        """The figures as a JSON object, for the ``limits`` field of ``queued`` frames."""
        return asdict(self)


def duration(seconds: float) -> str:
    """Render a duration as OpenAI's rate-limit headers do: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs
