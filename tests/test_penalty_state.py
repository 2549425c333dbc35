"""The penalties' rows kept on the device between steps (executor/penalty_state.py) against the same rows built
from each request's tokens, over steps where requests come, grow, leave, come back and share the batch with
requests without penalties."""
import types

import numpy as np
import torch

from sageinfer.executor.penalty_state import PenaltyState
from sageinfer.sampling_params import SamplingParams

V = 50


def _request(rid, penalties, rng):
    params = SamplingParams(repetition_penalty=1.2) if penalties else SamplingParams()
    return types.SimpleNamespace(request_id=rid, sampling_params=params,
                                 prompt_token_ids=rng.integers(0, V, int(rng.integers(1, 30))).tolist(),
                                 output_token_ids=[], num_pending_tokens=0, last_sampled_row=-1, pending=None)


def _expected(requests):
    """What penalties read, from the tokens alone (placeholders, -1, not yet counted, but the previous step's
    samples, which the state reads on the device)."""
    counts = torch.zeros(len(requests), V, dtype=torch.int32)
    prompt = torch.zeros(len(requests), V, dtype=torch.bool)
    for row, r in enumerate(requests):
        if not r.sampling_params.uses_penalties:
            continue
        known = [t for t in r.output_token_ids if t >= 0] + ([r.pending] if r.pending is not None else [])
        counts[row] = torch.bincount(torch.tensor(known, dtype=torch.int64), minlength=V).int()
        prompt[row, r.prompt_token_ids] = True
    return counts, prompt


def test_rows_kept_on_the_device_are_the_rows_the_tokens_make():
    rng = np.random.default_rng(0)
    state = PenaltyState(V, torch.device("cpu"), lambda array, device: torch.as_tensor(array).to(device))
    pool = [_request(f"r{i}", penalties=i % 4 != 0, rng=rng) for i in range(24)]
    for step in range(60):
        batch = [r for r in pool if rng.random() < 0.7 or (step >= 29 and r.request_id == "r5")]  # the others absent
        rng.shuffle(batch)
        for r in batch:
            r.output_token_ids += rng.integers(0, V, int(rng.integers(0, 3))).tolist()
            if step % 7 == 3:  # a token still on the device (a placeholder) and no samples handed over: counted
                r.output_token_ids.append(-1)  # once resolved
                r.num_pending_tokens = 1
            if step == 30 and r.request_id == "r5":
                r.output_token_ids = r.output_token_ids[:2]  # cut back: its slot is made again
        prev = torch.from_numpy(rng.integers(0, V, len(batch) + 5))  # the previous step's samples
        for r in batch:  # async scheduling: some requests' newest token is the previous step's sample
            if step % 7 != 3 and rng.random() < 0.4:
                r.last_sampled_row = int(rng.integers(0, len(prev)))
                r.output_token_ids.append(-1)
                r.num_pending_tokens, r.pending = 1, int(prev[r.last_sampled_row])
        counts, prompt = state.batch_rows(batch, None if step % 7 == 3 else prev)
        want_counts, want_prompt = _expected(batch)
        assert torch.equal(counts, want_counts), step
        assert torch.equal(prompt, want_prompt), step
        assert state.num_requests == sum(r.sampling_params.uses_penalties for r in batch)  # the absent gave theirs back
        for r in batch:  # resolve the placeholders: the previous step's samples, or a token of their own
            if r.pending is not None:
                r.output_token_ids[-1] = r.pending
            r.output_token_ids = [int(rng.integers(0, V)) if t < 0 else t for t in r.output_token_ids]
            r.num_pending_tokens, r.pending = 0, None
    assert 19 <= state.num_slots <= 64  # 18 requests with penalties at most, and slot 0, doubling from 8
