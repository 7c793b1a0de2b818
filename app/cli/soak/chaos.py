"""A chaos monkey for a private stack: ``kill -9`` a random worker or front end, start another."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

from app.cli.bench.config import BenchError
from app.cli.bench.stack import Stack


class Killer:
    """Every few seconds, kill -9 a worker or front-end process and start a replacement.

    Runs in a thread beside the load.  The victim is a random process of the
    role whose turn it is (workers and front ends alternate, so both die);
    its replacement starts in a thread of its own, so kills keep their pace
    however slowly processes start.  Until a replacement is up the stack has
    one process fewer, and clients of a killed front end reconnect to the
    others.

    Example::

        killer = Killer(stack, interval_s=4)
        killer.start()
        ...
        killer.stop()
        print(killer.kills)
    """

    def __init__(self, stack: Stack, interval_s: float, seed: int = 0,
                 roles: tuple[str, ...] = ("worker", "web")) -> None:
        self.stack = stack
        self.interval_s = interval_s
        self.roles = roles
        self.rng = random.Random(seed)
        self.kills: Counter[str] = Counter()
        #: What happened, one line per kill, with seconds since start.
        self.log: list[str] = []
        #: Replacements that failed to start (the stack is then one process short).
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-killer", daemon=True)
        self._replacements: list[threading.Thread] = []
        self._t0 = 0.0

    def start(self) -> None:
        """Start killing."""
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop killing and wait until every replacement is up (or failed)."""
        self._stop.set()
        self._thread.join()
        for thread in self._replacements:
            thread.join()

    def _loop(self) -> None:
        turn = 0
        while not self._stop.wait(self.interval_s * (0.5 + self.rng.random())):
            role = self.roles[turn % len(self.roles)]
            turn += 1
            victims = self.stack.serving(role)
            if len(victims) < 2:
                continue  # keep one serving while the replacements start
            child = self.rng.choice(victims)
            self.stack.kill(child)
            self.kills[role] += 1
            self.log.append(f"{time.monotonic() - self._t0:6.1f}s killed {child.name} "
                            f"(pid {child.pid})")
            thread = threading.Thread(target=self._replace, args=(role, child.name), daemon=True)
            self._replacements.append(thread)
            thread.start()

    def _replace(self, role: str, victim: str) -> None:
        started = time.monotonic()
        try:
            if role == "worker":
                self.stack.add_worker()
            else:
                self.stack.add_web()
        except BenchError as e:
            self.errors.append(f"replacing {victim}: {e}")
            return
        self.log.append(f"{time.monotonic() - self._t0:6.1f}s replacement of {victim} up in "
                        f"{time.monotonic() - started:.1f}s")
