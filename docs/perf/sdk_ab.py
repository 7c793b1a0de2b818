"""In-process A/B of two trees' workers/provider.py: client CPU per 1-token request, gevent-patched.

usage: python sdk_ab.py TREE_A TREE_B [N]   (starts its own mock: TTFT 0, 1 token)
Alternates A B B A ... (6 runs of N requests each), prints CPU µs and wall ms per request
and the mock's accepted connections per request.
"""
from gevent import monkey; monkey.patch_all()
import importlib.util, json, statistics, subprocess, sys, time, urllib.request
from tasks.config import Settings

N = int(sys.argv[3]) if len(sys.argv) > 3 else 300
mock = subprocess.Popen([sys.executable, "-c", "from app.cli.dev.mockllm import serve, MockConfig; "
                         "serve(MockConfig(ttft_ms=0, itl_ms=0, output_tokens=1), port=0)"],
                        stdout=subprocess.PIPE, text=True)
try:
    url = mock.stdout.readline().split("listening on ", 1)[1].split()[0]
    stats = lambda: json.load(urllib.request.urlopen(url.removesuffix("/v1") + "/mock/stats"))
    providers = {}
    for tag, tree in (("A", sys.argv[1]), ("B", sys.argv[2])):
        spec = importlib.util.spec_from_file_location(f"provider_{tag}", f"{tree}/workers/provider.py")
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        providers[tag] = mod.Provider(Settings(openai_base_url=url, provider_max_retries=0))
    msgs = [{"role": "user", "content": "hello there"}]
    def run(p, n):
        for _ in range(n):
            with p.stream("mock-1", msgs, 1) as s:
                list(s)
    res = {"A": [], "B": []}
    for k in ["A", "B", "B", "A", "A", "B"]:
        run(providers[k], 20)
        c = stats()["connections"]
        c0, w0 = time.process_time(), time.perf_counter()
        run(providers[k], N)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        conns = stats()["connections"] - c - 1
        res[k].append(1e6 * cpu / N)
        print(f"{k}: {1e6 * cpu / N:6.0f} us CPU/request  {1e3 * wall / N:5.2f} ms wall  "
              f"{conns / N:.2f} connections/request", flush=True)
    for k in "AB":
        print(f"median {k}: {statistics.median(res[k]):.0f} us CPU/request")
finally:
    mock.terminate(); mock.wait()
