"""CPU time of process trees, from the kernel's own accounting in ``/proc/PID/stat``."""

from __future__ import annotations

import os
from collections import defaultdict

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: role -> pid -> CPU seconds (user + system) at one moment.
Snapshot = dict[str, dict[int, float]]


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds the process has used, or ``None`` if it is gone."""
    fields = _stat(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime


def descendants(roots: list[int]) -> set[int]:
    """The given pids and every living process below them."""
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None:
                children[int(fields[1])].append(int(name))
    found: set[int] = set()
    todo = [p for p in roots if os.path.exists(f"/proc/{p}")]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def snapshot(roles: dict[str, list[int]]) -> Snapshot:
    """CPU seconds of every process in each role's trees (e.g. a gunicorn master and workers)."""
    out: Snapshot = {}
    for role, roots in roles.items():
        out[role] = {}
        for pid in descendants(roots):
            seconds = cpu_seconds(pid)
            if seconds is not None:
                out[role][pid] = seconds
    return out


def delta(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (processes born between count fully)."""
    used: dict[str, float] = {}
    for role, pids in after.items():
        base = before.get(role, {})
        used[role] = sum(max(0.0, s - base.get(pid, 0.0)) for pid, s in pids.items())
    return used


def self_cpu_seconds() -> float:
    """CPU seconds this process has used."""
    t = os.times()
    return t.user + t.system
