"""The mixed-length workloads (sageinfer/bench/mixed.py) offline, on vLLM or sageInfer: the same
prompts, output lengths and scheduler limits for both, dummy weights, all requests at once.

  python benchmarks/mixes_offline.py --engine vllm|sageinfer --model DIR [--mixes chat-mix:1000,...]
      [--kv-cache-dtype fp8] [--out r.json]

On the GPU machine with vLLM carried (../shared/bench/vllm-on-device.md), one engine per process:
  PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
      python3 benchmarks/mixes_offline.py --engine vllm --model sageinfer/bench/standard/qwen3-8b --out v.json
  python3 benchmarks/mixes_offline.py --engine sageinfer --model sageinfer/bench/standard/qwen3-8b --out s.json
Prompts are cut to --max-model-len (default Qwen3-8B's 40,960, vLLM's default for it). --passes 2 runs
each mix twice in a row, the prefix cache emptied before each (the same prompts again would hit it): a
first pass may pay kernel compiles that a warm engine does not (either engine's), the second shows the
warm one; each pass is recorded. Requests are greedy unless --temperature is above 0 (then --top-k and --top-p
apply, the same on both engines; Qwen3's generation config: --temperature 0.6 --top-k 20 --top-p 0.95);
--repetition-penalty applies to either. --admission-lookahead-tokens N (sageInfer only) sets the scheduler's
admission lookahead (benchmarks/schedule_replay.py counts what each value does to the steps). --json-every N
(sageInfer only) gives every Nth request a JSON-object grammar, for an A/B of how grammar requests share steps
with the others: the model directory is copied with a small byte-level tokenizer (grammars need one), and such a
request ends where its grammar does, so its output tokens are counted as generated, not as asked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.bench.mixed import mixed_prompts  # noqa: E402

MAX_MODEL_LEN = 40960
LIMITS = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384}  # vLLM 0.26's H100 defaults


def make_llm(engine: str, model: str, kv_cache_dtype: str, max_model_len: int, sampling: dict,
             with_tokenizer: bool = False, engine_options: dict | None = None):
    kwargs = dict(model=model, load_format="dummy", skip_tokenizer_init=not with_tokenizer, dtype="bfloat16", seed=0,
                  gpu_memory_utilization=0.90, kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len, **LIMITS,
                  **(engine_options or {}))
    if engine == "vllm":
        from vllm import LLM, SamplingParams

        def params(n):
            return SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, **sampling)
    else:
        from sageinfer import LLM, SamplingParams

        from sageinfer.sampling_params import StructuredOutputsParams

        def params(n, json_object=False):
            grammar = StructuredOutputsParams(json_object=True) if json_object else None
            return SamplingParams(max_tokens=n, ignore_eos=True, structured_outputs=grammar, **sampling)
    return LLM(**kwargs), params


def with_small_tokenizer(model: str) -> str:
    """A copy of the model directory (its config) with a small byte-level tokenizer saved beside it."""
    import shutil
    import tempfile

    from sageinfer.models.tiny import build_tokenizer
    path = tempfile.mkdtemp(prefix="mix-model-")
    shutil.copy(os.path.join(model, "config.json"), path)
    build_tokenizer().save_pretrained(path)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=["vllm", "sageinfer"])
    parser.add_argument("--model", required=True, help="model directory (config.json; dummy weights)")
    parser.add_argument("--mixes", default="chat-mix:1000,summarize-mix:300,long-mix:300")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    parser.add_argument("--passes", type=int, default=1, help="runs of each mix, one after the other")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: none")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1: none (Qwen2.5's config asks 1.05)")
    parser.add_argument("--json-every", type=int, default=0, help="every Nth request with a JSON-object grammar "
                        "(sageInfer only; 0: none)")
    parser.add_argument("--admission-lookahead-tokens", type=int, default=None,
                        help="sageInfer only: the scheduler's admission lookahead (default: the engine's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.admission_lookahead_tokens is not None and args.engine != "sageinfer":
        parser.error("--admission-lookahead-tokens is a sageInfer scheduler option")
    engine_options = ({"admission_lookahead_tokens": args.admission_lookahead_tokens}
                      if args.admission_lookahead_tokens is not None else {})
    if args.json_every and args.engine != "sageinfer":
        parser.error("--json-every runs on sageInfer only (dummy weights write different JSON in each engine)")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    if args.top_k > 0:  # (left out when off: the engines spell "none" differently across versions)
        sampling["top_k"] = args.top_k
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    start = time.perf_counter()
    model = with_small_tokenizer(args.model) if args.json_every else args.model
    llm, params = make_llm(args.engine, model, args.kv_cache_dtype, args.max_model_len, sampling,
                           with_tokenizer=bool(args.json_every), engine_options=engine_options)
    record = {"engine": args.engine, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "sampling": sampling, "json_every": args.json_every, "engine_options": engine_options,
              "startup_s": time.perf_counter() - start, "kv_cache_dtype": args.kv_cache_dtype, "mixes": {}}
    if args.engine == "sageinfer":
        sys.path.insert(0, os.path.dirname(__file__))
        from provenance import source_version
        record.update(source_version())
    else:
        import vllm
        record["vllm"] = vllm.__version__
    warm, _ = mixed_prompts("chat-mix", 16, vocab, 99, min(2048, args.max_model_len))
    llm.generate([{"prompt_token_ids": p} for p in warm], params(16), use_tqdm=False)
    print(f"| engine | mix | pass | requests | seconds | tok/s | output tok/s |  (startup {record['startup_s']:.0f} s)")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.mixes.split(","):
        name, num = spec.split(":")
        prompts, out_lens = mixed_prompts(name, int(num), vocab, args.seed, args.max_model_len)
        passes = []
        for n in range(1, args.passes + 1):
            llm.reset_prefix_cache()  # each pass computes every prompt (both engines have it)
            t = time.perf_counter()
            grammar = [bool(args.json_every) and i % args.json_every == 0 for i in range(len(prompts))]
            request_params = [params(k, True) if g else params(k) for k, g in zip(out_lens, grammar)]
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], request_params, use_tqdm=False)
            seconds = time.perf_counter() - t
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            asked = sum(k for k, g in zip(out_lens, grammar) if not g)
            assert sum(len(o.outputs[0].token_ids) for o, g in zip(outs, grammar) if not g) == asked, \
                "a request stopped early"
            tokens = sum(len(p) for p in prompts) + generated
            passes.append({"seconds": seconds, "total_tok_s": tokens / seconds, "output_tok_s": generated / seconds})
            print(f"| {args.engine} | {name} | {n} | {num} | {seconds:.1f} | {tokens / seconds:.0f} | "
                  f"{generated / seconds:.0f} |", flush=True)
        # the last pass is the mix's number (the warm engine's where there are several)
        record["mixes"][name] = {"requests": int(num), **passes[-1], "passes": passes}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
