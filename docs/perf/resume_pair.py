"""Resume A/B: a front end's CPU to replay a job's log to sockets that resume it from the start.

usage: python resume_pair.py TREE_A TREE_B [SOCKETS] [ROUNDS]
Starts one private stack per tree (keep_stack.py, PYTHONPATH=TREE, one worker, mock: 400 tokens
3 ms apart, so the log holds about 400 events), runs one job on each, then SOCKETS sockets resume
it from seq 0 at once, ROUNDS times, alternating A B B A ...; prints the web role's CPU per resume.
"""
import asyncio, json, os, signal, statistics, subprocess, sys, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
from websockets.asyncio.client import connect
from app.cli.bench import cpu
trees = sys.argv[1:3]
S = int(sys.argv[3]) if len(sys.argv) > 3 else 100; R = int(sys.argv[4]) if len(sys.argv) > 4 else 8
def start(tag, tree):
    out = Path(f"/tmp/resume-pair-{os.getpid()}-{tag}.json"); out.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(HERE / "keep_stack.py"), str(out), "1"],
        env={**os.environ, "PYTHONPATH": tree, "MOCK_TOKENS": "400", "MOCK_ITL": "3"}, cwd=tree,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, out
async def main(infos):
    jobs = []
    for inf in infos:
        ws = await connect(inf["url"], additional_headers={"Authorization": f"Bearer {inf['key']}"}, proxy=None, compression=None, ping_interval=None, max_size=2**24)
        await ws.send(json.dumps({"type": "generate", "model": "mock-1", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}))
        n = 0
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == "queued": jid = m["job_id"]
            if m["type"] in ("token", "done"): n += 1
            if m["type"] in ("done", "error"): break
        print(f"job of {n} events"); jobs.append(jid)
        inf["socks"] = [await connect(inf["url"], additional_headers={"Authorization": f"Bearer {inf['key']}"}, proxy=None, compression=None, ping_interval=None, max_size=2**24) for _ in range(S)]
    async def resume(ws, jid):
        await ws.send(json.dumps({"type": "resume", "job_id": jid, "after": -1}))
        while True:
            m = json.loads(await ws.recv())
            if m["type"] in ("done", "error"): return
    res = [[], []]
    for k in range(R):
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            inf = infos[i]; roles = {"web": inf["roles"]["web"]}
            b = cpu.snapshot(roles)
            await asyncio.gather(*[resume(ws, jobs[i]) for ws in inf["socks"]])
            used = cpu.delta(b, cpu.snapshot(roles))["web"]
            res[i].append(used / S * 1e6)
    for t, r in zip("AB", res): print(t, "web us/resume median", round(statistics.median(r)), [round(x) for x in r])
procs = [start(t, tr) for t, tr in zip("AB", trees)]
try:
    infos = []
    for p, out in procs:
        while not out.exists(): time.sleep(0.5)
        infos.append(json.loads(out.read_text()))
    asyncio.run(main(infos))
finally:
    for p, out in procs: p.send_signal(signal.SIGTERM)
    for p, out in procs: p.wait(30); out.unlink(missing_ok=True)
