"""Throughput and latency measurements on an LLM, as the standard workloads define them."""
from __future__ import annotations

import statistics
import time

from sageinfer.bench.mixed import mixed_prompts
from sageinfer.bench.workloads import make_prompts
from sageinfer.sampling_params import SamplingParams


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_throughput(llm, workload: dict, use_tqdm: bool = True) -> dict:
    """A standard workload, or a mixed-length one ({"mix": name, "num_prompts", "seed"}: bench/mixed.py)."""
    vocab = llm.engine.model_config.vocab_size
    if "mix" in workload:
        prompts, out_lens = mixed_prompts(workload["mix"], workload["num_prompts"], vocab, workload.get("seed", 0),
                                          llm.engine.config.max_model_len)
    else:
        prompts = make_prompts(workload, vocab)
        out_lens = [workload["output_len"]] * len(prompts)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [_params(n) for n in out_lens], use_tqdm=use_tqdm)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(out_lens), "a request stopped early"
    prompt_tokens = sum(len(p) for p in prompts)
    return {"seconds": seconds, "total_tok_s": (prompt_tokens + generated) / seconds,
            "output_tok_s": generated / seconds, "req_s": len(prompts) / seconds,
            "prompt_tokens": prompt_tokens, "generated_tokens": generated}


def run_latency(llm, workload: dict) -> dict:
    """TTFT = median time of a max_tokens=1 request; TPOT = (median full time - TTFT) / (out - 1).
    Every timed call has a prompt of its own, so nothing is served from the prefix cache."""
    vocab = llm.engine.model_config.vocab_size
    repeats, out_len, batch = workload["repeats"], workload["output_len"], workload["batch"]
    prompts = make_prompts(workload, vocab, count=batch * (2 * repeats + 1))
    chunks = [prompts[i * batch:(i + 1) * batch] for i in range(2 * repeats + 1)]

    def timed(chunk, max_tokens):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in chunk], _params(max_tokens), use_tqdm=False)
        return time.perf_counter() - start

    timed(chunks[0], 8)  # warm-up at this prompt length
    ttfts = [timed(chunks[1 + i], 1) for i in range(repeats)]
    e2es = [timed(chunks[1 + repeats + i], out_len) for i in range(repeats)]
    ttft, e2e = statistics.median(ttfts), statistics.median(e2es)
    return {"ttft_s": ttft, "tpot_s": (e2e - ttft) / (out_len - 1), "e2e_s": e2e, "ttft_all": ttfts, "e2e_all": e2es}
