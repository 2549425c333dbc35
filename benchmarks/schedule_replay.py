"""A mixed-length workload through the engine's own scheduler and KV-cache manager, without a model, on the CPU:
every scheduled token is computed, one token is sampled when a request's known tokens are all computed. Prints,
per admission lookahead, what the steps would hold: how many, how many decode only, the batch sizes, how full
the KV cache ran, preemptions and recomputed tokens. Counts, not times: which lookahead is faster is for a GPU
run to say (benchmarks/mixes_offline.py with --admission-lookahead-tokens). With --ceilings (benchmarks/ceilings.py's
JSON) it also prints the schedule's floor: each step's kernels one after another at the card's ceilings
(sageinfer/bench/floors.py: scheduled_step_seconds), what no engine running this schedule can go below.

  python benchmarks/schedule_replay.py --mix chat-mix:1000 --kv-tokens 382800 [--lookaheads 0,64,256]
  python benchmarks/schedule_replay.py --workload T1-prefill-heavy --kv-tokens 382800   (a standard workload)
  python benchmarks/schedule_replay.py --mix chat-mix:1000 --kv-tokens 382800 --lookaheads 256 \
      --ceilings benchmarks/results/2026-12-05g-h100-ceilings.json [--scheme bf16] [--model DIR]

--kv-tokens: the KV cache's size in tokens, as an engine start logs it (382,800 for Qwen3-8B bf16 on an H100 at
0.9 of its memory, 2026-11-24).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.config import EngineConfig  # noqa: E402
from sageinfer.engine.request import Request  # noqa: E402
from sageinfer.engine.scheduler import Scheduler  # noqa: E402
from sageinfer.kv_cache.manager import KVCacheManager  # noqa: E402
from sageinfer.sampling_params import SamplingParams  # noqa: E402
from sageinfer.bench.floors import SCHEMES, ModelShape, causal_pairs, scheduled_step_seconds  # noqa: E402
from sageinfer.bench.mixed import mixed_prompts  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR, load_workloads, make_prompts  # noqa: E402

LIMITS = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}  # as benchmarks/mixes_offline.py


def replay(prompts: list[list[int]], outputs: list[int], kv_tokens: int, block_size: int, lookahead: int,
           max_model_len: int) -> dict:
    """Drive the scheduler over the requests, all arriving at once; the steps' counts, and each step's load
    (step_loads: rows, rows sampled, prefill (query, key) pairs, distinct cached keys the decodes read)."""
    config = EngineConfig(model="unused", admission_lookahead_tokens=lookahead, block_size=block_size, **LIMITS)
    config.max_model_len = max_model_len
    kv = KVCacheManager(kv_tokens // block_size, block_size, enable_caching=True)
    sched = Scheduler(config, kv)
    requests = []
    for i, (prompt, n) in enumerate(zip(prompts, outputs)):
        request = Request(f"r{i}", f"r{i}", 0, prompt, SamplingParams(max_tokens=n, ignore_eos=True), set())
        request.max_output_tokens = n
        sched.add_request(request)
        requests.append(request)
    steps = decode_only = computed = last_admission = 0
    admitted = set()
    decode_rows, step_tokens, used, loads = [], [], [], []
    while sched.has_unfinished():
        out = sched.schedule()
        if out.is_empty:
            raise RuntimeError("the scheduler scheduled nothing with requests left: they cannot fit this cache")
        steps += 1
        if any(id(r) not in admitted for r, _ in out.scheduled):
            last_admission = steps
            admitted.update(id(r) for r, _ in out.scheduled)
        decodes = sampled = pairs = 0
        keys_in_block: dict[int, int] = {}  # a block that decodes share (a prefix) is read once, as cascade reads it
        for r, n in out.scheduled:
            before = r.num_computed_tokens
            sampled += before + n == r.num_tokens
            if n == 1 and before >= r.num_prompt_tokens:
                decodes += 1
                context = before + 1  # its own new key too
                for j, block in enumerate(r.block_ids[:-(-context // block_size)]):
                    keys_in_block[block] = max(keys_in_block.get(block, 0), min(block_size, context - j * block_size))
            else:
                pairs += causal_pairs(n, before)
        loads.append((out.num_batched_tokens, sampled, pairs, sum(keys_in_block.values())))
        decode_only += decodes == len(out.scheduled)
        decode_rows.append(decodes)
        step_tokens.append(out.num_batched_tokens)
        used.append(kv.pool.usage())
        computed += out.num_batched_tokens
        sched.update_after_step(out)
        for request, _ in out.scheduled:
            if request.num_computed_tokens == request.num_tokens:
                request.resolve_placeholder(request.append_placeholder(0), 7)
                if request.num_output_tokens >= request.max_output_tokens:
                    sched.finish(request, "length")
    # the last token of each is not computed; prompt tokens found in the prefix cache at admission are not either
    needed = sum(len(p) for p in prompts) + sum(outputs) - len(outputs) - sum(r.num_cached_tokens for r in requests)
    return {"lookahead": lookahead, "steps": steps, "decode_only_steps": decode_only, "last_admission": last_admission,
            "mean_decode_rows": float(np.mean(decode_rows)), "mean_step_tokens": float(np.mean(step_tokens)),
            "mean_kv_used": float(np.mean(used)), "preemptions": sched.num_preemptions,
            "recomputed_tokens": computed - needed, "step_loads": loads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mix", default="chat-mix:1000", help="name:requests (sageinfer/bench/mixed.py)")
    parser.add_argument("--workload", default=None, help="a standard workload instead of a mix (its prompts, "
                        "shared prefix and output length; sageinfer/bench/standard/workloads.json)")
    parser.add_argument("--kv-tokens", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--lookaheads", default="0,32,64,128,256")
    parser.add_argument("--max-model-len", type=int, default=40960)
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--ceilings", default=None, help="benchmarks/ceilings.py's JSON: print the schedule's floor")
    parser.add_argument("--scheme", default="bf16", choices=sorted(SCHEMES), help="weights and KV bytes (floors)")
    parser.add_argument("--model", default=os.path.join(STANDARD_DIR, "qwen3-8b"), help="the model's shapes")
    parser.add_argument("--seed", type=int, default=0,
                        help="the mix's seed (mixes_offline.py's 0; a served run's --seed)")
    args = parser.parse_args()
    floor = None
    if args.ceilings:
        with open(args.ceilings) as f:
            ceilings = json.load(f)
        with open(os.path.join(args.model, "config.json")) as f:
            shape = ModelShape.from_config(json.load(f))

        def floor(loads) -> str:
            """The schedule's floor, and its share in steps that prefill and in decode-only ones."""
            seconds = [scheduled_step_seconds(shape, args.scheme, ceilings, *load) for load in loads]
            prefill = sum(s for s, load in zip(seconds, loads) if load[2] > 0)
            return f"{sum(seconds):.2f} s ({prefill:.2f} + {sum(seconds) - prefill:.2f})"
    if args.workload:
        workload = load_workloads()[args.workload]
        prompts = make_prompts(workload, args.vocab_size)
        outputs, label = [workload["output_len"]] * len(prompts), args.workload
    else:
        name, num = args.mix.split(":")
        prompts, outputs = mixed_prompts(name, int(num), args.vocab_size, args.seed, args.max_model_len)
        label = args.mix
    print(f"{label}: {sum(map(len, prompts)):,} prompt tokens, {sum(outputs):,} output tokens; KV cache "
          f"{args.kv_tokens:,} tokens in blocks of {args.block_size}")
    print("| lookahead | steps | decode-only steps | steps after the last admission | mean decode rows | "
          "mean tokens a step | mean KV used | preemptions | recomputed tokens |"
          + (" floor (steps that prefill + decode-only steps) |" if floor else ""))
    print("| --- " * (10 if floor else 9) + "|")
    for lookahead in (int(x) for x in args.lookaheads.split(",")):
        r = replay(prompts, outputs, args.kv_tokens, args.block_size, lookahead, args.max_model_len)
        print(f"| {lookahead} | {r['steps']} | {r['decode_only_steps']} | {r['steps'] - r['last_admission']} | "
              f"{r['mean_decode_rows']:.0f} | "
              f"{r['mean_step_tokens']:.0f} | {100 * r['mean_kv_used']:.1f}% | {r['preemptions']} | "
              f"{r['recomputed_tokens']:,} |" + (f" {floor(r['step_loads'])} |" if floor else ""), flush=True)


if __name__ == "__main__":
    main()
