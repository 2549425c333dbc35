"""Mixed-length workloads, the kind a server sees (the standard workloads give every request the same
lengths). Each mix draws per-request prompt and output lengths from a seeded distribution:

  chat-mix        conversation turns: lognormal prompts (median 700 tokens, long tail to 8K) and
                  answers (median 200, up to 1K)
  summarize-mix   documents in, summaries out: lognormal prompts (median 3K, up to 16K), outputs
                  (median 150, up to 512)
  long-mix        mostly 1024 in / 128 out, with one request in ten a long prompt of 8K-32K tokens
                  (steady decode while long prompts arrive: what prefill/decode separation is for)
"""
from __future__ import annotations

import numpy as np

MIXES = {
    "chat-mix": {"prompt": ("lognormal", 700, 1.0, 16, 8192), "output": ("lognormal", 200, 0.8, 8, 1024)},
    "summarize-mix": {"prompt": ("lognormal", 3000, 0.6, 256, 16384), "output": ("lognormal", 150, 0.5, 16, 512)},
    "long-mix": {"prompt": ("long_tail", 1024, 0.1, 8192, 32768), "output": ("fixed", 128)},
}


def _draw(rng: np.random.Generator, spec: tuple, n: int) -> np.ndarray:
    kind = spec[0]
    if kind == "lognormal":
        _, median, sigma, low, high = spec
        return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)
    if kind == "long_tail":
        _, short, share, low, high = spec
        long = rng.random(n) < share
        return np.where(long, rng.integers(low, high + 1, n), short).astype(int)
    if kind == "fixed":
        return np.full(n, spec[1], dtype=int)
    raise ValueError(f"unknown length distribution {kind!r}")


def mixed_lengths(name: str, num: int, seed: int, max_model_len: int | None = None) -> tuple[list[int], list[int]]:
    """Per-request (prompt lengths, output lengths); pairs longer than max_model_len are shortened
    (the prompt first gives way, keeping at least one output token)."""
    if name not in MIXES:
        raise ValueError(f"unknown mix {name!r}; known: {sorted(MIXES)}")
    rng = np.random.default_rng(seed)
    prompts, outputs = _draw(rng, MIXES[name]["prompt"], num), _draw(rng, MIXES[name]["output"], num)
    if max_model_len is not None:
        outputs = np.minimum(outputs, max_model_len - 1)
        prompts = np.minimum(prompts, max_model_len - outputs)
    return prompts.tolist(), outputs.tolist()


def mixed_prompts(name: str, num: int, vocab_size: int, seed: int,
                  max_model_len: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Random token-id prompts of the mix's lengths, and each request's output length."""
    lengths, outputs = mixed_lengths(name, num, seed, max_model_len)
    rng = np.random.default_rng(seed + 7)
    low, high = (1000, vocab_size - 1000) if vocab_size > 2000 else (vocab_size // 4, 3 * vocab_size // 4)
    return [rng.integers(low, high, size=n).tolist() for n in lengths], outputs
