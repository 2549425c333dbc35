"""On the GPU: the engine's fast path (Triton kernels, decode graphs) against transformers and
against the plain-torch reference path, on tiny random models; last, Llama-3.1's long context
(prompts of 64K and 128K tokens, VERY_LONG="65536,131072" to change them; "" to skip).

  python benchmarks/gpu_engine_check.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from oracle import assert_greedy_matches_hf  # noqa: E402
from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.models.tiny import build_tiny_model  # noqa: E402


def main() -> None:
    root = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (1, 9, 40, 130, 300, 17, 5, 64)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    failures = 0
    for arch in ("llama", "qwen3", "qwen2"):
        path = build_tiny_model(os.path.join(root, arch), arch, hidden_size=128, num_heads=4, num_kv_heads=2)
        fast = LLM(path, dtype="float32", num_gpu_blocks_override=256, max_num_batched_tokens=64, show_progress=False)
        assert fast.engine.runner.backend.name == "triton" and fast.engine.runner.graphs is not None
        outs = fast.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        failures += count_mismatches(path, prompts, outs, f"{arch} fp32 vs transformers")
        assert fast.engine.runner.prefill_graphs is not None
        # One at a time: whole-prompt prefills run as captured graphs.
        outs = [fast.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts]
        failures += count_mismatches(path, prompts, outs, f"{arch} single-prompt (prefill graph) vs transformers")
        # 72 prompts on one 300-token prefix: decode steps replay a graph of 80 or more sequences that
        # attends the shared prefix once (cascade): 80 sequences x 2 KV heads need no KV splits.
        shared = rng.integers(3, 500, size=300).tolist()
        group = [shared + rng.integers(3, 500, size=n).tolist() for n in range(1, 73)]
        casc = LLM(path, dtype="float32", num_gpu_blocks_override=1024, show_progress=False)
        outs = casc.generate([{"prompt_token_ids": p} for p in group], params, use_tqdm=False)
        assert any(key[0] >= 80 for key in casc.engine.runner.graphs.cascade_keys), casc.engine.runner.graphs.cascade_keys
        failures += count_mismatches(path, group, outs,
                                     f"{arch} shared-prefix batch (cascade decode graph) vs transformers")
        bf_fast = LLM(path, dtype="bfloat16", num_gpu_blocks_override=256, show_progress=False)
        bf_ref = LLM(path, dtype="bfloat16", num_gpu_blocks_override=256, attention_backend="torch_ref",
                     enforce_eager=True, show_progress=False)
        a = bf_fast.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        b = bf_ref.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        agree = np.mean([x == y for oa, ob in zip(a, b) for x, y in zip(oa.outputs[0].token_ids,
                                                                         ob.outputs[0].token_ids)])
        first_diff = [next((i for i, (x, y) in enumerate(zip(oa.outputs[0].token_ids, ob.outputs[0].token_ids))
                            if x != y), None) for oa, ob in zip(a, b)]
        print(f"{arch}: fp32 fast path vs transformers checked on {len(prompts)} prompts; bf16 fast vs "
              f"reference token agreement {agree:.3f}, first divergence per prompt {first_diff}")
    failures += check_long_prompts(root, rng)
    lengths = [int(n) for n in os.environ.get("VERY_LONG", "65536,131072").split(",") if n]
    failures += check_very_long_prompts(root, rng, lengths)
    print("ENGINE CHECK", "FAILED" if failures else "PASSED", f"({failures} failures)")


def count_mismatches(path, prompts, outs, label) -> int:
    """Prompts whose greedy tokens are not transformers' argmax (tf32 dots on the GPU: near-ties pass)."""
    failures = 0
    for p, o in zip(prompts, outs):
        try:
            assert_greedy_matches_hf(path, p, o.outputs[0].token_ids, tie_tol=2e-2)
        except AssertionError as exc:
            failures += 1
            print(f"{label}: prompt len {len(p)}: {exc}")
    return failures


def check_long_prompts(root, rng) -> int:
    """Prompts from 4,096 tokens take the platform's own prefill kernel where there is one (Hopper):
    head dim 128, fp16, one whole-prompt chunk and chunks of 2,048 after cached context."""
    path = build_tiny_model(os.path.join(root, "qwen3-long"), "qwen3", hidden_size=512, num_heads=4, num_kv_heads=1,
                            max_position_embeddings=8192)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (6000, 4500)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    failures = 0
    for chunk in (8192, 2048):
        llm = LLM(path, dtype="float16", num_gpu_blocks_override=512, max_num_batched_tokens=chunk,
                  max_model_len=8192, show_progress=False)
        kernel = llm.engine.runner.backend.platform_prefill
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        failures += count_mismatches(path, prompts, outs, f"long prompts in chunks of {chunk} vs transformers")
        print(f"long prompts in chunks of {chunk}: platform prefill kernel "
              f"{'none' if kernel is None else 'used' if kernel.enabled else 'DISABLED after an error'}")
    return failures


def check_very_long_prompts(root, rng, lengths: list[int]) -> int:
    """Llama-3.1's long context on a tiny model of its shape of attention: llama3 rope scaling (factor
    8 over 8,192 positions, to 131,072), head dim 128, a prompt of each length in chunks of 16,384,
    against transformers at the same length (on the same device, sdpa attention, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    if not lengths:
        return 0
    path = build_tiny_model(os.path.join(root, "llama31-long"), "llama", hidden_size=256, num_heads=2, num_kv_heads=1,
                            max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    from sageinfer.platforms import get_platform
    device = get_platform().device(0)
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    oracle = oracle.to(device).eval()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    failures = 0
    for n in lengths:
        n = min(n, 131072 - 16)  # the prompt and its tokens within the model's 131,072 positions
        prompt = rng.integers(3, 500, size=n).tolist()
        llm = LLM(path, dtype="float32", max_model_len=n + 16, max_num_batched_tokens=16384,
                  num_gpu_blocks_override=(n + 16) // 16 + 64, block_size=16, show_progress=False)
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
        # The oracle in chunks of 8,192 over its cache: whole, a 128K prompt's float32 scores take 128 GB.
        ids, cache, rows = torch.tensor([prompt + out[:-1]], device=device), DynamicCache(), []
        with torch.no_grad():
            for start in range(0, ids.shape[1], 8192):
                step = oracle(ids[:, start:start + 8192], past_key_values=cache, use_cache=True)
                rows.append(step.logits[0].float().cpu())
        logits = torch.cat(rows)[n - 1:]
        bad = [(step, token, int(row.argmax())) for step, (token, row) in enumerate(zip(out, logits))
               if token != int(row.argmax()) and row[token] < row.max() - 2e-2]  # (tf32 dots: near-ties pass)
        failures += bool(bad)
        print(f"llama3-scaled rope, {n}-token prompt: {'MISMATCH ' + str(bad) if bad else 'greedy tokens match'} "
              f"transformers")
    return failures


if __name__ == "__main__":
    main()
