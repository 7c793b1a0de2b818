"""gunicorn settings for ``docs/perf/memory.py --trace DIR``: Sluice's own, plus tracemalloc.

The worker polls ``$SLUICE_MEMTRACE_DIR`` for ``NAME.req``; for each it takes a
tracemalloc snapshot (after a ``gc.collect()``), and for ``open-N`` writes the
top allocation sites against ``before-N`` to ``open-N.txt`` (by line and by
traceback).  Measurement only: never used by a deployment.
"""

from __future__ import annotations

import os
from typing import Any

from app.gunicorn_conf import *  # noqa: F403
from app.gunicorn_conf import post_worker_init as _sluice_post_worker_init


def post_worker_init(worker: Any) -> None:
    import gc
    import tracemalloc
    from pathlib import Path

    import gevent

    _sluice_post_worker_init(worker)
    out = Path(os.environ["SLUICE_MEMTRACE_DIR"])
    tracemalloc.start(25)
    snaps: dict[str, tracemalloc.Snapshot] = {}

    def watch() -> None:
        while True:
            gevent.sleep(0.2)
            for req in sorted(out.glob("*.req")):
                name = req.stem
                req.unlink()
                gc.collect()
                snaps[name] = snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)])
                if name.startswith("open-"):
                    base = snaps["before-" + name.split("-", 1)[1]]
                    lines = []
                    for key in ("filename", "lineno", "traceback"):
                        stats = snap.compare_to(base, key)
                        total = sum(s.size_diff for s in stats)
                        lines.append(f"== by {key}: total {total / 1024:,.0f} KiB")
                        for s in stats[:40]:
                            lines.append(f"{s.size_diff / 1024:9.1f} KiB {s.count_diff:+7d}")
                            frames = s.traceback.format() if key == "traceback" \
                                else [str(s.traceback[0])]
                            lines.extend("      " + f for f in frames[-24:])
                    (out / f"{name}.txt").write_text("\n".join(lines))
                (out / f"{name}.done").write_text("")

    gevent.spawn(watch)
