"""transformers' own forward pass as the oracle for generated tokens."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(model_dir)(torch.tensor([token_ids])).logits[0].float()


def assert_greedy_matches_hf(model_dir: str, prompt_ids: list[int], output_ids: list[int], tie_tol: float = 1e-4):
    """Teacher-forced check: each generated token is transformers' argmax given the same prefix
    (a token within tie_tol of the maximum logit also passes: an exact tie has no single argmax)."""
    assert output_ids, "nothing was generated"
    logits = hf_logits(model_dir, prompt_ids + output_ids[:-1])
    for step, token in enumerate(output_ids):
        row = logits[len(prompt_ids) - 1 + step]
        best = int(row.argmax())
        assert token == best or row[token] >= row[best] - tie_tol, (
            f"step {step}: generated {token} (logit {row[token]:.5f}), transformers' argmax {best} ({row[best]:.5f})")


@torch.no_grad()
def hf_prompt_logprobs(model_dir: str, token_ids: list[int]):
    """transformers' logprob of each token after its prefix (numpy, len - 1), the model loaded afresh on the
    CPU (quantized checkpoints run through their library's own layers there)."""
    import numpy as np
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu").eval()
    lp = model(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)
    return np.array([lp[i - 1, token_ids[i]].item() for i in range(1, len(token_ids))])
