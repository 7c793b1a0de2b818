"""Redis round trips per 1-token job, from MONITOR: python rtt.py TREE [JOBS]

Starts a private stack from TREE, runs 3 warm-up jobs, then MONITORs while JOBS single jobs run
one after another. Counts top-level commands (a MULTI…EXEC or a pipeline's commands sent together
count once per MULTI; commands Lua runs are not counted), excluding BRPOP, PING and the reaper's
periodic ZRANGE/claims. Prints per-job counts by command and the total.
"""
import asyncio, collections, json, os, signal, subprocess, sys, threading, time
from pathlib import Path
import redis
HERE = Path(__file__).resolve().parent
tree, jobs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
from websockets.asyncio.client import connect  # noqa: E402


async def run(url, key, n):
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, proxy=None) as ws:
        for _ in range(n):
            await ws.send(json.dumps({"type": "generate", "model": "mock-1", "max_tokens": 1,
                                      "messages": [{"role": "user", "content": "hello there"}]}))
            while json.loads(await ws.recv())["type"] not in ("done", "error"):
                pass

out = Path(f"/tmp/perf1-rtt-{os.getpid()}.json")
p = subprocess.Popen([sys.executable, str(HERE / "keep_stack.py"), str(out), "1"],
                     env={**os.environ, "PYTHONPATH": tree}, cwd=tree, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    while not out.exists():
        assert p.poll() is None, "stack exited"
        time.sleep(0.3)
    info = json.loads(out.read_text())
    asyncio.run(run(info["url"], info["key"], 3))
    time.sleep(1)
    seen, stop = [], threading.Event()
    def monitor():
        with redis.Redis.from_url(info["redis"]).monitor() as m:
            for cmd in m.listen():
                if stop.is_set():
                    return
                seen.append(cmd)
    threading.Thread(target=monitor, daemon=True).start()
    time.sleep(0.5)
    asyncio.run(run(info["url"], info["key"], jobs))
    time.sleep(0.5); stop.set(); time.sleep(1.2)
    counts = collections.Counter(); in_multi = False
    for c in seen:
        if c.get("client_type") == "lua":
            continue
        words = c["command"].split()
        name = words[0].upper()
        if name in ("BRPOP", "PING", "MONITOR") or (name == "ZRANGE" and "running" in c["command"]):
            continue
        if name == "MULTI":
            in_multi = True; continue
        if name == "EXEC":
            in_multi = False; counts["MULTI…EXEC"] += 1; continue
        if in_multi:
            continue
        if name == "EVALSHA":
            name += " " + words[1][:8]
        elif name == "PUBLISH":
            name += " " + words[1][:24]
        counts[name] += 1
    for k, v in sorted(counts.items()):
        print(f"  {v / jobs:5.2f}  {k}")
    print(f"round trips per job: {sum(counts.values()) / jobs:.1f}")
finally:
    p.send_signal(signal.SIGTERM); p.wait(30); out.unlink(missing_ok=True)
