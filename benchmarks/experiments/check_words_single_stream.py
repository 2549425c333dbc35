"""On the GPU: single-stream greedy decode of tiny random models in bf16 and fp16 with the one-row word
kernel (ops/gemv_words.py) against the element-wise kernel, and against transformers in float32 (as
gpu_engine_check.py checks the fast path): tokens that agree, the first divergence of each prompt.

  python benchmarks/experiments/check_words_single_stream.py
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import sageinfer.ops.gemv_words as gemv_words  # noqa: E402
from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.models.tiny import build_tiny_model  # noqa: E402


LAUNCHES = []
_REAL = gemv_words.gemv_words
gemv_words.gemv_words = lambda *a, **kw: LAUNCHES.append(1) or _REAL(*a, **kw)  # ops.gemv looks it up per call


def greedy(path, dtype, prompt, params, words: bool):
    gemv_words.GEMV_WORDS = words  # in this process; the variable for an engine process of its own
    os.environ["SAGEINFER_GEMV_WORDS"] = "1" if words else "0"
    llm = LLM(path, dtype=dtype, num_gpu_blocks_override=128, show_progress=False)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    del llm
    return out.token_ids, [max(lp.values(), key=lambda v: v.logprob).logprob for lp in out.logprobs]


def main() -> None:
    root = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=1)
    for arch in ("llama", "qwen3"):
        path = build_tiny_model(os.path.join(root, arch), arch, hidden_size=256, num_heads=4, num_kv_heads=2)
        for dtype in ("bfloat16", "float16"):
            for n in (5, 70):
                prompt = rng.integers(3, 500, size=n).tolist()
                LAUNCHES.clear()
                a, la = greedy(path, dtype, prompt, params, True)
                launched = len(LAUNCHES)
                b, lb = greedy(path, dtype, prompt, params, False)
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                gap = max((abs(la[i] - lb[i]) for i in range(len(a) if first is None else first)), default=0.0)
                agree = np.mean([x == y for x, y in zip(a, b)])
                print(f"{arch} {dtype} prompt {n}: words vs elements agree on {agree:.3f} of tokens, first divergence "
                      f"{first}, largest top-logprob gap before it {gap:.4f} (word kernel launched or captured "
                      f"{launched} times)", flush=True)


if __name__ == "__main__":
    main()
