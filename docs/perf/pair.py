"""Paired CPU comparison of two Sluice trees under the same background load.

usage: python pair.py TREE_A TREE_B [--sockets 200] [--rounds 2] [--runs 8] [--workers 1]
       [--tokens 1] [--env-a VAR=VAL ...] [--env-b VAR=VAL ...]
Starts one private stack per tree (keep_stack.py, PYTHONPATH=TREE, this interpreter's venv),
then measures alternately A B B A A B ...: S sockets each send a 1-token generate per round,
R rounds per run (``--tokens N``: N-token jobs, the mock streaming them MOCK_ITL ms apart, 0 unless
set); CPU per job by role from /proc (web, worker, redis, and the mock apart).
Prints every run, the per-role medians, and B/A of the totals per adjacent pair.
"""
import argparse, asyncio, json, os, signal, statistics, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("tree_a"); ap.add_argument("tree_b")
ap.add_argument("--sockets", type=int, default=200); ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--runs", type=int, default=8); ap.add_argument("--workers", type=int, default=1)
ap.add_argument("--tokens", type=int, default=1)
ap.add_argument("--env-a", nargs="*", default=[]); ap.add_argument("--env-b", nargs="*", default=[])
a = ap.parse_args()

from websockets.asyncio.client import connect  # noqa: E402
from app.cli.bench import cpu  # noqa: E402


def mock_connections(base_url):
    """Connections the mock accepted so far (-1 when it does not count them; this call is one)."""
    import urllib.request
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.loads(resp.read()).get("connections", -10**9)


def redis_calls(url):
    """Calls so far of the commands whose count per job is worth printing (INFO commandstats)."""
    import redis
    with redis.Redis.from_url(url) as r:
        stats = r.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)
            for name in ("lpush", "evalsha", "brpop")}


async def one_job(ws, ref):
    await ws.send(json.dumps({"type": "generate", "ref": ref, "model": "mock-1", "max_tokens": a.tokens,
                              "messages": [{"role": "user", "content": "hello there"}]}))
    while True:
        d = json.loads(await ws.recv())
        if d["type"] in ("done", "error"):
            return d["type"] == "done"


async def rounds(socks, r):
    bad = 0
    for i in range(r):
        bad += sum(not ok for ok in await asyncio.gather(*[one_job(ws, i) for ws in socks]))
    return bad


def start(tag, tree, env):
    out = Path(f"/tmp/perf1-pair-{os.getpid()}-{tag}.json")
    out.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(HERE / "keep_stack.py"), str(out), str(a.workers), *env],
                         env={**os.environ, "PYTHONPATH": tree, "MOCK_TOKENS": str(a.tokens)}, cwd=tree, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "w"))
    return p, out


async def main(info):
    socks = {}
    for k, inf in info.items():
        socks[k] = await asyncio.gather(*[connect(inf["url"], additional_headers={
            "Authorization": f"Bearer {inf['key']}"}, max_size=2**24, ping_interval=None,
            proxy=None, compression=None) for _ in range(a.sockets)])
        await rounds(socks[k], 2)  # warm-up
    order = [k for i in range(a.runs // 2) for k in (("A", "B") if i % 2 == 0 else ("B", "A"))]
    res = {"A": [], "B": []}
    for k in order:
        roles = info[k]["roles"]
        await asyncio.sleep(0.3)
        conns = mock_connections(info[k]["mock"])
        calls = redis_calls(info[k]["redis"])
        before = cpu.snapshot(roles); t0 = time.perf_counter()
        bad = await rounds(socks[k], a.rounds)
        dt = time.perf_counter() - t0
        used = cpu.delta(before, cpu.snapshot(roles)); n = a.sockets * a.rounds
        conns = mock_connections(info[k]["mock"]) - conns - 1
        r = {role: s / n * 1e6 for role, s in used.items()}
        r["total"] = sum(v for role, v in r.items() if role != "mock")
        r["jobs/s"] = n / dt
        after = redis_calls(info[k]["redis"])
        # LPUSH per job = broker messages per job (in or out of a script); BRPOP = deliveries.
        for name, v in after.items():
            r[f"{name}/job"] = (v - calls[name]) / n
        if conns >= 0:
            r["model conns/100 jobs"] = conns * 100 / n
        res[k].append(r)
        print(k, {x: round(v, 3 if "/job" in x else 1) for x, v in r.items()}, f"errors={bad}" if bad else "", flush=True)
    for k in ("A", "B"):
        med = {role: round(statistics.median(x[role] for x in res[k]), 3 if "/job" in role else 1) for role in res[k][0]}
        print(f"median {k} ({info[k]['tree']}):", json.dumps(med))
    ratios = [b["total"] / x["total"] for x, b in zip(res["A"], res["B"])]
    print("B/A total per pair:", [round(x, 2) for x in ratios])
    for role in ("web", "worker", "redis", "mock"):
        rr = [b[role] / x[role] for x, b in zip(res["A"], res["B"]) if x[role]]
        print(f"  B/A {role}: median {statistics.median(rr):.2f}  {[round(x, 2) for x in rr]}")
    for k in socks.values():
        for ws in k:
            await ws.close()


procs = {}
try:
    procs["A"] = start("A", a.tree_a, a.env_a)
    procs["B"] = start("B", a.tree_b, a.env_b)
    info = {}
    deadline = time.monotonic() + 180
    while len(info) < 2:
        for k, (p, out) in procs.items():
            if p.poll() is not None:
                sys.exit(f"stack {k} exited: {Path(str(out) + '.log').read_text()[-2000:]}")
            if k not in info and out.exists():
                info[k] = json.loads(out.read_text())
        if time.monotonic() > deadline:
            sys.exit("stacks did not start")
        time.sleep(0.5)
    asyncio.run(main(info))
finally:
    for p, out in procs.values():
        p.send_signal(signal.SIGTERM)
    for p, out in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
        out.unlink(missing_ok=True)
