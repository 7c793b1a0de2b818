"""Start a private Sluice from the tree on PYTHONPATH; write its info to OUT.json; run until SIGTERM.

usage: PYTHONPATH=TREE python keep_stack.py OUT.json [WORKERS] [VAR=VAL ...]
(mock: TTFT 0, 1 token; set MOCK_TTFT / MOCK_ITL / MOCK_TOKENS to change)
"""
import json, os, signal, sys, time
from pathlib import Path
from app.cli.bench import cpu
from app.cli.bench.config import StackOptions
from app.cli.bench.stack import Stack, ROOT

out, workers = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
env = tuple(tuple(e.split("=", 1)) for e in sys.argv[3:])
stack = Stack(StackOptions(workers=workers, mock_ttft_ms=float(os.environ.get("MOCK_TTFT", 0)),
                           mock_itl_ms=float(os.environ.get("MOCK_ITL", 0)),
                           mock_output_tokens=int(os.environ.get("MOCK_TOKENS", 1)), env=env),
              model="mock-1")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    stack.start()
    roles = {r: sorted(cpu.descendants(p)) for r, p in stack.roles().items()}
    roles["mock"] = stack.mock_pids()
    Path(out).write_text(json.dumps({"url": stack.urls[0], "key": stack.api_key, "tree": str(ROOT),
                                     "redis": stack.redis_url, "roles": roles, "mock": stack.mock_url}))
    while True:
        time.sleep(1)
finally:
    stack.stop()
