"""The standard workloads: random token-id prompts exactly as the shared workload file defines them."""
from __future__ import annotations

import json
import os

import numpy as np

# Shipped with the package: workloads, vLLM anchors, and the configs of the benchmark models.
STANDARD_DIR = os.path.join(os.path.dirname(__file__), "standard")


def load_workloads(path: str | None = None) -> dict:
    with open(path or os.path.join(STANDARD_DIR, "workloads.json")) as f:
        return json.load(f)["workloads"]


def load_anchors(path: str | None = None) -> dict:
    with open(path or os.path.join(STANDARD_DIR, "anchors-vllm-h100.json")) as f:
        return json.load(f)


def make_prompts(workload: dict, vocab_size: int, count: int | None = None) -> list[list[int]]:
    """count overrides num_prompts (latency workloads draw as many distinct prompts as they need)."""
    rng = np.random.default_rng(workload["seed"])
    # The standard range; tiny test vocabularies (< 2001 ids) use their middle half instead.
    low, high = (1000, vocab_size - 1000) if vocab_size > 2000 else (vocab_size // 4, 3 * vocab_size // 4)
    n = count if count is not None else workload.get("num_prompts", workload.get("batch", 1))
    shared = workload.get("shared_prefix_len", 0)
    prefix = rng.integers(low, high, size=shared).tolist() if shared else []
    unique = rng.integers(low, high, size=(n, workload["input_len"] - shared))
    return [prefix + row.tolist() for row in unique]
