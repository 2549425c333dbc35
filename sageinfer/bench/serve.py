"""Serving benchmark against any OpenAI-compatible server (sageInfer's, vLLM's, ...).

Poisson arrivals (or all at once with rate inf), every request streamed; reports request and token
throughput, TTFT / TPOT / ITL / E2E statistics and goodput under SLOs. Prompts are random token ids
sent as a token array to /v1/completions, so no tokenizer is needed on the client.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm.auto import tqdm

from sageinfer.bench.mixed import MIXES, mixed_prompts


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    low, high = (1000, vocab_size - 1000) if vocab_size > 2000 else (vocab_size // 4, 3 * vocab_size // 4)
    return rng.integers(low, high, size=(num, input_len)).tolist()


def as_text(prompt: list[int]) -> str:
    """Token ids as text of numbered words ("t17 t4032 ..."), for front ends that read text (a
    router matching prefixes by characters); benchmarks/word_tokenizer.py's tokenizer maps each word
    back to its id."""
    return " ".join(f"t{i}" for i in prompt)


async def _one(http: httpx.AsyncClient, url: str, headers: dict, model: str, prompt: list[int],
               output_len: int, extra: dict | None = None, text: bool = False) -> RequestResult:
    body = {"model": model, "prompt": as_text(prompt) if text else prompt, "max_tokens": output_len,
            "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})}
    result = RequestResult(ok=False, prompt_len=len(prompt))
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with http.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    result.error = payload["error"].get("message", "error event")
                    return result
                if payload.get("usage"):
                    result.output_tokens = payload["usage"]["completion_tokens"]
                if payload.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_benchmark(base_url: str, model: str, prompts: list[list[int]], output_len: int | list[int],
                        request_rate: float, max_concurrency: int | None, api_key: str | None, seed: int,
                        show_progress: bool = True) -> tuple[list[RequestResult], float]:
    """output_len: one for all requests, or each request's own."""
    output_lens = output_len if isinstance(output_len, list) else [output_len] * len(prompts)
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = np.random.default_rng(seed + 1)
    gaps = rng.exponential(1.0 / request_rate, size=len(prompts)) if np.isfinite(request_rate) else np.zeros(len(prompts))
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    bar = tqdm(total=len(prompts), desc="Requests", unit="req", disable=not show_progress)
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        async def submit(prompt, out_len):
            async with limit:
                r = await _one(http, url, headers, model, prompt, out_len)
            bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for prompt, out_len, gap in zip(prompts, output_lens, gaps):
            tasks.append(asyncio.create_task(submit(prompt, out_len)))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    arr = np.array(values) * 1e3
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99))}


# Prompt lengths (tokens) whose requests' TTFT is also reported apart: on a mix sent at once, which
# prompts go first decides the median as much as the engine's speed does.
TTFT_PROMPT_EDGES = (1024, 4096, 16384)


def ttft_by_prompt_len(results: list[RequestResult]) -> dict:
    """TTFT statistics of the completed requests by prompt length: "<=1024", "<=4096", ..., ">16384"
    (buckets without a request left out), each with its count."""
    buckets: dict[str, list[float]] = {}
    for r in results:
        if r.ok:
            edge = next((e for e in TTFT_PROMPT_EDGES if r.prompt_len <= e), None)
            buckets.setdefault(f"<={edge}" if edge else f">{TTFT_PROMPT_EDGES[-1]}", []).append(r.ttft)
    return {name: {"count": len(values), **_stats(values)} for name, values in buckets.items()}


def summarize(results: list[RequestResult], duration: float, slo_ms: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)

    def meets(r: RequestResult) -> bool:
        checks = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2e}
        return all(checks[k] * 1e3 <= v for k, v in slo_ms.items())

    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration, "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft for r in ok]), "ttft_ms_by_prompt_len": ttft_by_prompt_len(results),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itl]), "e2el_ms": _stats([r.e2e for r in ok]),
        "slo_ms": slo_ms, "goodput_req_s": sum(1 for r in ok if meets(r)) / duration if slo_ms else None,
    }


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="random", choices=["random", *MIXES, "multi-turn"],
                   help="random: --input-len / --output-len for every request; a mix draws each request's "
                        "lengths (sageinfer/bench/mixed.py); multi-turn: --num-prompts conversations of --turns "
                        "turns, each opening with its own --input-len prefix (sageinfer/bench/multiturn.py)")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns of each conversation")
    p.add_argument("--user-len", type=int, default=64, help="multi-turn: tokens of each new user message")
    p.add_argument("--max-model-len", type=int, default=None, help="a mix's requests are shortened to fit this")
    p.add_argument("--text-prompts", action="store_true",
                   help="multi-turn: send each prompt as text of numbered words (t<id>), for routers that match "
                        "text; the model directory needs benchmarks/word_tokenizer.py's tokenizer")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    p.add_argument("--result-file", default=None)


def main_from_args(args: argparse.Namespace) -> int:
    slo = {}
    for item in args.goodput:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput entries look like ttft:500, tpot:50 or e2el:10000; got {item!r}")
        slo[key] = float(value)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    extra = {}
    if args.dataset == "multi-turn":
        from sageinfer.bench.multiturn import conversations, run_conversations, turn_split
        sessions = conversations(args.num_prompts, args.turns, args.input_len, args.user_len, args.output_len,
                                 args.vocab_size, args.seed)
        by_session, duration = asyncio.run(run_conversations(args.base_url, args.model, sessions, args.output_len,
                                                             args.max_concurrency, args.api_key,
                                                             text=args.text_prompts))
        results = [r for s in by_session for r in s]
        results += [RequestResult(ok=False, prompt_len=0, error="an earlier turn of its conversation failed")
                    for s, prompts in zip(by_session, sessions) for _ in range(len(prompts) - len(s))]
        extra = {"turns": args.turns, "user_len": args.user_len, "text_prompts": args.text_prompts,
                 **turn_split(by_session)}
    else:
        if args.dataset == "random":
            prompts = random_prompts(args.num_prompts, args.input_len, args.vocab_size, args.seed)
            output_lens = args.output_len
        else:
            prompts, output_lens = mixed_prompts(args.dataset, args.num_prompts, args.vocab_size, args.seed,
                                                 args.max_model_len)
        results, duration = asyncio.run(run_benchmark(args.base_url, args.model, prompts, output_lens,
                                                      args.request_rate, args.max_concurrency, args.api_key,
                                                      args.seed))
    summary = summarize(results, duration, slo)
    summary.update(extra)
    summary.update({"base_url": args.base_url, "model": args.model, "dataset": args.dataset,
                    "input_len": args.input_len if args.dataset in ("random", "multi-turn") else None,
                    "output_len": args.output_len if args.dataset in ("random", "multi-turn") else None,
                    "num_prompts": args.num_prompts, "request_rate": args.request_rate,
                    "max_concurrency": args.max_concurrency})
    print(f"completed {summary['completed']}/{len(results)} in {duration:.2f} s: "
          f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s")
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "first_turn_ttft_ms", "later_turn_ttft_ms"):
        if metric not in summary:
            continue
        s = summary[metric]
        if s["mean"] is not None:
            print(f"{metric:8s} mean {s['mean']:9.2f}  median {s['median']:9.2f}  p90 {s['p90']:9.2f}  "
                  f"p99 {s['p99']:9.2f}")
    if len(summary["ttft_ms_by_prompt_len"]) > 1:
        for name, s in summary["ttft_ms_by_prompt_len"].items():
            print(f"ttft_ms prompts {name:7s} ({s['count']}): median {s['median']:9.2f}  p90 {s['p90']:9.2f}")
    if summary["goodput_req_s"] is not None:
        print(f"goodput {summary['goodput_req_s']:.2f} req/s under {slo}")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["failed"] == 0 else 1
