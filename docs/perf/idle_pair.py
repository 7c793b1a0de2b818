"""Idle A/B: two private stacks up at once; lone 1-token jobs alternately A, B; time send -> first token.

usage: python idle_pair.py TREE_A TREE_B [N] [WORKERS]
Starts one private stack per tree (keep_stack.py, PYTHONPATH=TREE, mock TTFT 0, WORKERS worker
processes), warms each with 20 jobs, then sends N lone jobs to each, alternating A B B A ..., 0.1 s
apart, and prints the client's TTFT percentiles per tree.  Idle latency drifts by milliseconds
between runs on a shared machine; alternating request by request cancels the drift.
"""
import asyncio, json, os, statistics, subprocess, sys, time
from pathlib import Path
from websockets.asyncio.client import connect
ta, tb = sys.argv[1], sys.argv[2]; N = int(sys.argv[3]) if len(sys.argv) > 3 else 200
W = sys.argv[4] if len(sys.argv) > 4 else "1"
def start(tag, tree):
    out = Path(f"/tmp/idle-pair-{os.getpid()}-{tag}.json"); out.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "keep_stack.py"), str(out), W],
                         env={**os.environ, "PYTHONPATH": tree}, cwd=tree, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, out
async def one(ws):
    t0 = time.perf_counter()
    await ws.send(json.dumps({"type": "generate", "model": "mock-1", "max_tokens": 1,
                              "messages": [{"role": "user", "content": "hello there"}]}))
    ttft = None
    while True:
        m = json.loads(await ws.recv())
        if m["type"] == "token" and ttft is None: ttft = time.perf_counter() - t0
        if m["type"] in ("done", "error"): return ttft * 1000
async def main(infos):
    socks = [await connect(i["url"], additional_headers={"Authorization": f"Bearer {i['key']}"},
                           proxy=None, compression=None, ping_interval=None) for i in infos]
    for ws in socks:
        for _ in range(20): await one(ws); await asyncio.sleep(0.05)
    res = [[], []]
    for k in range(N):
        order = (0, 1) if k % 2 == 0 else (1, 0)
        for i in order:
            res[i].append(await one(socks[i])); await asyncio.sleep(0.1)
    for tag, r in zip("AB", res):
        r.sort(); print(f"{tag}: p50 {statistics.median(r):.2f} ms  p25 {r[len(r)//4]:.2f}  p75 {r[3*len(r)//4]:.2f}  p90 {r[9*len(r)//10]:.2f}")
ps = [start("A", ta), start("B", tb)]
try:
    for p, out in ps:
        while not out.exists():
            assert p.poll() is None; time.sleep(0.3)
    asyncio.run(main([json.loads(out.read_text()) for _, out in ps]))
finally:
    for p, _ in ps: os.killpg(p.pid, 15)
    for p, _ in ps: p.wait()
