"""First jobs on a freshly started stack: are the first job of each process slower?

usage: python cold.py TREE [--workers 3] [--jobs 8] [--ttft 0]
Starts a private stack from TREE (keep_stack.py, PYTHONPATH=TREE), waits 1 s, then sends JOBS
single 1-token jobs one after another, each on a new socket 0.3 s apart (BRPOP's FIFO hands
consecutive jobs to different worker processes, so the first WORKERS jobs each meet a fresh
process). Prints send->queued, send->first token, and the done frame's provider_ttft_ms and
queue_wait_ms for each job.
"""
import argparse, asyncio, json, os, signal, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("tree"); ap.add_argument("--workers", type=int, default=3)
ap.add_argument("--jobs", type=int, default=8); ap.add_argument("--ttft", default="0")
a = ap.parse_args()
from websockets.asyncio.client import connect  # noqa: E402


async def job(url, key):
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, proxy=None,
                       ping_interval=None, compression=None) as ws:
        await asyncio.sleep(0.3)
        t0 = time.perf_counter(); out = {}
        await ws.send(json.dumps({"type": "generate", "model": "mock-1", "max_tokens": 1,
                                  "messages": [{"role": "user", "content": "hello there"}]}))
        while True:
            d = json.loads(await ws.recv()); now = (time.perf_counter() - t0) * 1000
            if d["type"] == "queued":
                out["queued_ms"] = round(now, 1)
            elif d["type"] == "token" and "first_ms" not in out:
                out["first_ms"] = round(now, 1)
            elif d["type"] in ("done", "error"):
                m = d.get("metrics", {})
                out.update(provider_ttft_ms=m.get("provider_ttft_ms"),
                           queue_wait_ms=m.get("queue_wait_ms"), end=d["type"])
                return out


out = Path(f"/tmp/perf1-cold-{os.getpid()}.json")
p = subprocess.Popen([sys.executable, str(HERE / "keep_stack.py"), str(out), str(a.workers)],
                     env={**os.environ, "PYTHONPATH": a.tree, "MOCK_TTFT": a.ttft}, cwd=a.tree,
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    while not out.exists():
        if p.poll() is not None:
            sys.exit("stack exited")
        time.sleep(0.3)
    info = json.loads(out.read_text())
    time.sleep(1.0)
    for i in range(a.jobs):
        print(i + 1, asyncio.run(job(info["url"], info["key"])), flush=True)
finally:
    p.send_signal(signal.SIGTERM); p.wait(30); out.unlink(missing_ok=True)
