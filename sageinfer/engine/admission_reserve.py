"""How many KV blocks admission holds back for the running requests to grow (the scheduler's lookahead).

Each running request may grow by up to `lookahead` tokens (and no further than its max_tokens). Holding back
all of that at once is what the scheduler did: it never has to preempt, but on a mix of lengths a request
close to its max_tokens holds room it will never use, since it ends and frees all its blocks first. Here
the requests grow one token a step and a request that reaches its max_tokens within the lookahead gives its
blocks back two steps after its last token (the engine reads a step's tokens a step late); what is held
back is the most the running requests need at once over the lookahead. Never more than holding back every
request's whole growth; where no request can end within the lookahead, the same.

The most is taken over intervals of GRID steps, each bounded by the requests active at its start at their
size at its end: a bound that costs a few vector operations rather than one evaluation a step.
"""
from __future__ import annotations

import numpy as np

GRID = 16
RELEASE_DELAY = 2  # steps from a request's last token until its blocks are free to the scheduler


def ends_within(num_tokens, end_tokens, decoding, lookahead: int):
    """Whether a request may end within the lookahead (elementwise on arrays): its max_tokens is reached by then,
    and its prompt is computed (a prefill's chunks may take several steps)."""
    return decoding & (end_tokens <= num_tokens + lookahead)


def reserve_blocks(num_tokens: np.ndarray, end_tokens: np.ndarray, held_blocks: np.ndarray, decoding: np.ndarray,
                   lookahead: int, block_size: int, freed_blocks: np.ndarray | None = None) -> int:
    """Blocks to hold back beyond those the requests hold now.

    num_tokens: each request's known tokens (prompt, outputs and the one in flight); end_tokens: its prompt plus
    max_tokens; held_blocks: the blocks it holds now (this step's slots included); decoding: whether its prompt is
    computed (ends_within); freed_blocks: of those, the ones its end frees (a prefix-cache block that other
    requests share stays in use; default: all)."""
    if len(num_tokens) == 0 or lookahead <= 0:
        return 0
    target = np.minimum(end_tokens, num_tokens + lookahead)  # the most each may grow to within the lookahead
    ends = ends_within(num_tokens, end_tokens, decoding, lookahead)
    # its last token is computed at step end - num_tokens; its blocks are free RELEASE_DELAY steps later
    freed_at = np.where(ends, end_tokens - num_tokens + RELEASE_DELAY, np.iinfo(np.int64).max)
    interval_ends = np.arange(GRID, lookahead + RELEASE_DELAY + GRID, GRID)[:, None]  # steps b of [b - GRID, b)
    step = np.minimum(interval_ends - 1, freed_at[None, :] - 1)
    tokens = np.minimum(target[None, :], num_tokens[None, :] + np.maximum(step, 1) - 1)
    blocks = np.maximum(held_blocks[None, :], -(-tokens // block_size))
    active = freed_at[None, :] > interval_ends - GRID
    freed = held_blocks if freed_blocks is None else freed_blocks
    # an active request's blocks past those it holds, less what the ended ones freed (their growth, and their
    # own blocks)
    need = ((blocks - held_blocks[None, :]) * active).sum(axis=1) - (freed[None, :] * ~active).sum(axis=1)
    return max(0, int(need.max()))
