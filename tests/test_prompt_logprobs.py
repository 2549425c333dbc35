"""prompt_logprobs: each prompt token's logprob given the tokens before it, as transformers computes
it, whatever the chunking, the prefix cache or the tensor-parallel size."""
import numpy as np
import pytest
import torch

from ranks import needs_ranks
from sageinfer import LLM, SamplingParams


def _reference(model_dir, prompt):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].log_softmax(-1)


def _check(out, prompt, ref, k):
    entries = out.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    for position in range(1, len(prompt)):
        entry, row = entries[position], ref[position - 1]
        token = prompt[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert set(top) <= set(entry) and [entry[t].rank for t in top if t != token] == \
            [r + 1 for r, t in enumerate(top) if t != token]


def test_prompt_logprobs_match_transformers_across_chunks_and_the_prefix_cache(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, block_size=16, max_num_batched_tokens=24,
              show_progress=False, attention_backend="torch_ref")  # exact float32 on a GPU too (no tf32)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 500, size=70).tolist()
    ref = _reference(llama_dir, prompt)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]  # three prefill chunks
    _check(first, prompt, ref, 3)
    # The same prompt again: cached now, but prompt logprobs compute every position anyway.
    again = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0,
                                                                     n=2), use_tqdm=False)[0]
    _check(again, prompt, ref, 0)
    plain = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == first.outputs[0].token_ids
    one = llm.generate({"prompt_token_ids": [7]}, params, use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]


def test_prompt_logprobs_beyond_max_logprobs_are_refused(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate("x", SamplingParams(prompt_logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


@needs_ranks(2)
def test_tp2_prompt_logprobs_equal_tp1(llama_dir):
    prompt = list(range(20, 90))
    results = []
    for tp in (1, 2):
        llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, tensor_parallel_size=tp,
                  max_num_batched_tokens=32, show_progress=False)
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=2),
                           use_tqdm=False)[0]
        results.append(out.prompt_logprobs)
        llm.engine.shutdown()
    one, two = results
    assert one[0] is None and two[0] is None
    for a, b in zip(one[1:], two[1:]):
        assert set(a) == set(b)
        # two ranks sum each row-split matmul in another order (2e-5 apart measured on GPUs)
        np.testing.assert_allclose([a[t].logprob for t in a], [b[t].logprob for t in a], atol=1e-4)
