"""CPU per 1-token request, client side, of three SDK request paths (in-process, gevent)."""
from gevent import monkey; monkey.patch_all()
import json, sys, time, httpx2, openai
from openai._streaming import SSEDecoder
URL = sys.argv[1]
def mk(): return openai.OpenAI(base_url=URL, api_key="x", max_retries=0,
        http_client=openai.DefaultHttpxClient(limits=httpx2.Limits(max_connections=None, max_keepalive_connections=8)))
c = mk()
msgs = [{"role": "user", "content": "hello there"}]
body = {"model": "mock-1", "messages": msgs, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}}
def drain(resp):
    out = []
    for sse in SSEDecoder().iter_bytes(resp.iter_bytes()):
        if sse.data.startswith("[DONE]"): continue
        out.append(json.loads(sse.data))
    return out
def old():
    s = c.post("/chat/completions", body=body, cast_to=object, stream=True, stream_cls=openai.Stream[object])
    list(s); s.close()
def raw_post():
    r = c.post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True)
    try: drain(r)
    finally: r.close()
def create():
    with c.chat.completions.with_streaming_response.create(model="mock-1", messages=msgs, max_tokens=1, stream=True, stream_options={"include_usage": True}) as r:
        drain(r)
for rep in range(3):
    for name, f in (("old SDK Stream", old), ("post cast_to=Response", raw_post), ("with_streaming_response.create", create)):
        for _ in range(20): f()
        N = 300; c0 = time.process_time(); w0 = time.perf_counter()
        for _ in range(N): f()
        print(f"{name:32s} {1e6*(time.process_time()-c0)/N:5.0f} us CPU/req {1e3*(time.perf_counter()-w0)/N:.2f} ms wall")
