"""Abuse cases against `sageinfer serve` on the tiny model (CPU is enough), timed: clients that
leave, logprobs on long outputs, oversized bodies and prompts, a missing key, logprobs over the cap.
Run from the repository root: python benchmarks/probe_server_faults.py"""
import asyncio, sys, time, httpx
sys.path.insert(0, "tests")
from server_util import ServerProcess
import tempfile
from sageinfer.models.tiny import build_tiny_model
d = build_tiny_model(tempfile.mkdtemp() + "/llama", "llama")
srv = ServerProcess(d, "--max-num-seqs", "256")
H = srv.headers
def t(fn):
    s = time.monotonic(); r = fn(); return r, time.monotonic() - s
try:
    # 1. 50 clients leave after 1 s
    async def impatient(i):
        async with httpx.AsyncClient(timeout=1.0) as http:
            try:
                await http.post(srv.base_url + "/v1/completions", headers=H, json={"model": "tiny", "prompt": [9 + i] * 30, "max_tokens": 1000, "ignore_eos": True})
            except httpx.TimeoutException: pass
    async def run(): await asyncio.gather(*(impatient(i) for i in range(50)))
    asyncio.run(run()); gone = time.monotonic()
    while True:
        m = srv.metrics()
        if m["sageinfer:num_requests_running"] + m["sageinfer:num_requests_waiting"] == 0: break
        time.sleep(0.02)
    print(f"50 clients gone after 1 s: all aborted {time.monotonic() - gone:.2f} s later; generated tokens {m['sageinfer:generation_tokens_total']:.0f}")
    # 2. logprobs cost
    for lp, n in ((None, 1), (20, 1), (20, 4)):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "n": n}
        if lp: body["logprobs"] = lp
        r, dt = t(lambda: httpx.post(srv.base_url + "/v1/completions", headers=H, json=body, timeout=600))
        print(f"1000 tokens logprobs={lp} n={n}: {r.status_code} in {dt:.1f} s")
    # 3. 50 MB prompt / tokenize 5 MB without key
    big = b'{"model": "tiny", "prompt": "' + b"a" * (50 * 2**20) + b'"}'
    r, dt = t(lambda: httpx.post(srv.base_url + "/v1/completions", headers={**H, "Content-Type": "application/json"}, content=big, timeout=120))
    print(f"50 MB prompt: {r.status_code} in {dt:.2f} s")
    r, dt = t(lambda: httpx.post(srv.base_url + "/tokenize", json={"prompt": "a" * 5 * 2**20}, timeout=120))
    print(f"/tokenize 5 MB, no key: {r.status_code} in {dt:.2f} s")
    r, dt = t(lambda: httpx.post(srv.base_url + "/tokenize", headers=H, json={"prompt": "a" * 5 * 2**20}, timeout=120))
    print(f"/tokenize 5 MB, with key: {r.status_code} in {dt:.2f} s: {r.json()['error']['message'][:90]}")
    r = httpx.post(srv.base_url + "/v1/completions", headers=H, json={"model": "tiny", "prompt": "hi", "logprobs": 1000}, timeout=60)
    print("logprobs 1000:", r.status_code, r.json()["error"]["message"], "| health", httpx.get(srv.base_url + "/health").status_code)
finally:
    print("exit", srv.stop())
