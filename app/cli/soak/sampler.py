"""Memory over time: RSS of every process of a stack and Redis's own figures, with slopes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil
import redis

from app.cli.bench.stack import Stack

MB = 1024 * 1024


@dataclass
class Series:
    """Samples of one quantity: (minutes since start, megabytes)."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)

    def slope_mb_per_min(self, skip_min: float = 1.0) -> float | None:
        """Least-squares slope past the first ``skip_min`` minutes (warm-up); None if too few."""
        pts = [p for p in self.points if p[0] >= skip_min] or self.points
        if len(pts) < 2:
            return None
        n = len(pts)
        mx = sum(t for t, _ in pts) / n
        my = sum(v for _, v in pts) / n
        var = sum((t - mx) ** 2 for t, _ in pts)
        return sum((t - mx) * (v - my) for t, v in pts) / var if var else None


class Sampler:
    """Samples RSS of each Sluice process (gunicorn workers and all) and Redis memory.

    Example::

        sampler = Sampler(stack)
        sampler.sample()          # every minute
        for s in sampler.series.values(): print(s.name, s.slope_mb_per_min())
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.redis = redis.Redis.from_url(stack.redis_url)
        self.series: dict[str, Series] = {}
        self._t0 = time.monotonic()

    def sample(self) -> None:
        """Take one sample of every process alive now and of Redis."""
        t = (time.monotonic() - self._t0) / 60
        for role, kids in self.stack.children.items():
            for child in list(kids):
                try:
                    root = psutil.Process(child.pid)
                    procs = [root, *root.children(recursive=True)]
                    for i, proc in enumerate(procs):
                        name = f"{child.name}" if i == 0 else f"{child.name}/{proc.pid}"
                        self._add(f"{role}:{name}", t, proc.memory_info().rss / MB)
                except psutil.NoSuchProcess:
                    continue
        info = self.redis.info("memory")
        self._add("redis used_memory", t, int(info["used_memory"]) / MB)
        self._add("redis used_memory_rss", t, int(info["used_memory_rss"]) / MB)

    def close(self) -> None:
        """Close the Redis connection."""
        self.redis.close()

    def _add(self, name: str, t: float, mb: float) -> None:
        self.series.setdefault(name, Series(name)).points.append((t, mb))
