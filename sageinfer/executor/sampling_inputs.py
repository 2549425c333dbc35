"""Turn the sampling parameters of the requests that sample this step into device tensors."""
from __future__ import annotations

import numpy as np
import torch

from sageinfer.executor.penalty_state import PenaltyState
from sageinfer.layers.sampler import SamplingBatch


def build_sampling_batch(requests: list, vocab_size: int, device: torch.device, to_device,
                         penalties: PenaltyState, prev_token_ids: torch.Tensor | None = None,
                         token_masks: bool = True) -> SamplingBatch:
    """to_device(host_tensor, device): the platform's non-blocking host->device copy; penalties: the rows
    penalties read, kept on the device between steps; prev_token_ids: the previous step's samples, still on
    the device (the newest tokens of requests that sampled there). token_masks=False leaves out what reads
    the tokens generated so far on the host (bad words, grammars): add_token_masks adds it once they are known."""
    params = [r.sampling_params for r in requests]
    num = len(requests)
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    batch = SamplingBatch(
        temperature=torch.tensor([0.0 if p.is_greedy else p.temperature for p in params], dtype=torch.float32),
        top_k=torch.tensor(top_k, dtype=torch.int64),
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
        min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32),
        generators=[r.generator for r in requests],
        all_greedy=all(p.is_greedy for p in params),
        top_k_host=[0 if p.is_greedy else k for p, k in zip(params, top_k)],
        needs_filter=any(not p.is_greedy and (k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0)
                         for p, k in zip(params, top_k)),
        needs_sort=any(not p.is_greedy and (k < vocab_size or p.top_p < 1.0) for p, k in zip(params, top_k)),
        max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
    )
    if any(p.uses_penalties for p in params):
        batch.presence_penalty = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)
        batch.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)
        batch.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
        batch.output_token_counts, batch.prompt_token_mask = penalties.batch_rows(requests, prev_token_ids)
    banned = [(row, t) for row, r in enumerate(requests)
              if r.num_output_tokens < r.sampling_params.min_tokens
              for t in sorted(r.sampling_params.all_stop_token_ids | (set() if r.sampling_params.ignore_eos else r.eos_token_ids))
              if t < vocab_size]
    if banned:
        rows, tokens = zip(*banned)
        batch.banned_rows = torch.tensor(rows, dtype=torch.int64)
        batch.banned_tokens = torch.tensor(tokens, dtype=torch.int64)
    biased = [(row, t, v) for row, p in enumerate(params) if p.logit_bias for t, v in p.logit_bias.items()]
    if biased:
        rows, tokens, values = zip(*biased)
        batch.bias_rows = torch.tensor(rows, dtype=torch.int64)
        batch.bias_tokens = torch.tensor(tokens, dtype=torch.int64)
        batch.bias_values = torch.tensor(values, dtype=torch.float32)
    if any(p.allowed_token_ids for p in params):
        mask = torch.ones(num, vocab_size, dtype=torch.bool)
        for row, p in enumerate(params):
            if p.allowed_token_ids:
                mask[row] = False
                mask[row, torch.tensor(p.allowed_token_ids, dtype=torch.int64)] = True
        batch.allowed_mask = mask
    for name in ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "output_token_counts", "prompt_token_mask", "banned_rows", "banned_tokens",
                 "bias_rows", "bias_tokens", "bias_values", "allowed_mask"):
        value = getattr(batch, name)
        if value is not None and value.device.type == "cpu":  # (the penalties' rows are there already)
            setattr(batch, name, to_device(value, device))
    if token_masks:
        add_token_masks(batch, requests, device, to_device)
    return batch


def add_token_masks(batch: SamplingBatch, requests: list, device: torch.device, to_device) -> None:
    """What reads the tokens generated so far on the host: each bad word's last token banned where the request
    has just generated the word's other tokens, and the allowed tokens of requests with a grammar (its bitmask
    row, filled by the engine)."""
    banned = [(row, t) for row, r in enumerate(requests) for t in _bad_word_endings(r)]
    if banned:
        rows, tokens = (to_device(torch.tensor(column, dtype=torch.int64), device) for column in zip(*banned))
        if batch.banned_rows is not None:  # after the min_tokens bans
            rows, tokens = torch.cat([batch.banned_rows, rows]), torch.cat([batch.banned_tokens, tokens])
        batch.banned_rows, batch.banned_tokens = rows, tokens
    bitmasks = [r.grammar_bitmask for r in requests]
    width = next((len(m) for m in bitmasks if m is not None), 0)
    if width:
        mask = np.full((len(requests), width), -1, dtype=np.int32)  # all bits set: every token allowed
        for row, m in enumerate(bitmasks):
            if m is not None:
                mask[row] = m
        batch.grammar_bitmask = to_device(torch.from_numpy(mask), device)


def _bad_word_endings(request) -> set[int]:
    """The last token of each bad word whose other tokens the request has just generated (its known tokens:
    a sample still on the device, the one this draw follows when masks wait for it, is left out)."""
    words = request.sampling_params.bad_words_token_ids
    if not words:
        return set()
    output = request.output_token_ids[:len(request.output_token_ids) - request.num_pending_tokens]
    return {w[-1] for w in words if len(w) <= len(output) + 1 and (len(w) == 1 or output[len(output) - len(w) + 1:] == w[:-1])}
