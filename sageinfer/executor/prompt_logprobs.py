"""Logprobs of prompt tokens (vLLM's prompt_logprobs): for each prompt position p computed in a
step, the logprob of prompt token p + 1 given those before it, its rank, and the top k.

The rows go through the LM head in slices, so a long prefill chunk never holds logits for all its
tokens at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_ROWS_PER_SLICE = 512


@dataclass
class PromptLogprobSpans:
    """Which rows of a step's hidden states predict prompt tokens, and of which requests."""
    rows: np.ndarray            # flat token rows of the step
    targets: np.ndarray         # the prompt token each row predicts
    spans: list                 # (request, first predicted position, count), in row order
    k: int                      # top-k to keep (the largest any of these requests asks)


@dataclass
class PromptLogprobsOutput:
    spans: list
    host_copy: object  # (host tensors, handle): target logprobs, ranks, top-k logprobs, top-k ids

    def to_lists(self) -> tuple[list, list, list | None, list | None]:
        host, handle = self.host_copy
        handle.synchronize()
        lists = [t.tolist() for t in host]
        return (lists[0], lists[1], lists[2], lists[3]) if len(lists) == 4 else (lists[0], lists[1], None, None)


def find_spans(scheduled: list, starts: np.ndarray, query_start_loc: np.ndarray) -> PromptLogprobSpans | None:
    rows, targets, spans, k = [], [], [], 0
    for i, (request, n) in enumerate(scheduled):
        want = request.sampling_params.prompt_logprobs
        if want is None:
            continue
        prompt = request.prompt_token_ids
        first, last = int(starts[i]), min(int(starts[i]) + n, len(prompt) - 1)  # position p predicts p + 1
        if first >= last:
            continue
        base = int(query_start_loc[i])
        rows.extend(range(base, base + last - first))
        targets.extend(prompt[first + 1:last + 1])
        spans.append((request, first + 1, last - first))
        k = max(k, want)
    if not spans:
        return None
    return PromptLogprobSpans(np.array(rows, dtype=np.int64), np.array(targets, dtype=np.int64), spans, k)


def compute(model, hidden: torch.Tensor, spans: PromptLogprobSpans, to_device, to_host_async) -> PromptLogprobsOutput:
    rows = to_device(spans.rows, hidden.device)
    targets = to_device(spans.targets, hidden.device)
    parts = [[], [], [], []]
    for lo in range(0, len(spans.rows), _ROWS_PER_SLICE):
        hi = lo + _ROWS_PER_SLICE
        logprobs = model.compute_logits(hidden[rows[lo:hi]]).float().log_softmax(dim=-1)
        target = logprobs.gather(1, targets[lo:hi].unsqueeze(1))
        parts[0].append(target.squeeze(1))
        parts[1].append((logprobs > target).sum(dim=-1) + 1)
        if spans.k > 0:
            top_lp, top_ids = logprobs.topk(spans.k, dim=-1)
            parts[2].append(top_lp)
            parts[3].append(top_ids)
    tensors = [torch.cat(p) for p in parts if p]
    return PromptLogprobsOutput(spans.spans, to_host_async(tensors))
