"""A tiny llama trained for a few hundred steps on the tokenizer's corpus, so its weights carry
structure (random weights cannot tell a good quantization scheme from a bad one)."""
from __future__ import annotations


import torch


def build_trained_model(path: str, steps: int = 300, hidden_size: int = 128, seed: int = 0) -> str:
    import transformers

    from sageinfer.models.tiny import _CORPUS, build_tiny_model
    build_tiny_model(path, "llama", seed=seed, hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("\n".join(_CORPUS * 2))])
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def corpus_token_ids(path: str) -> list[int]:
    import transformers

    from sageinfer.models.tiny import _CORPUS
    return transformers.AutoTokenizer.from_pretrained(path).encode("\n".join(_CORPUS))


def prompt_logprobs(path: str, ids: list[int], **options):
    """The engine's logprob of each token of ids after its prefix (float32, the torch reference attention),
    as a numpy array of len(ids) - 1."""
    import numpy as np

    from sageinfer import LLM, SamplingParams
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False,
              attention_backend="torch_ref", **options)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    llm.engine.shutdown()
    return np.array([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
