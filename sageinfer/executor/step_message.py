"""What a tensor-parallel worker needs to run a step, as a serialisable message of differences.

The scheduler (with rank 0's model runner) stays in the engine; each other rank keeps a mirror of
the requests it runs (`WorkerRequest`) and updates it from each step's message: new requests in
full, running ones by what changed since the last message (newly known tokens, new blocks, progress),
finished ones by id. No worker touches a scheduler object. Every rank samples the same tokens (the
logits are gathered whole on each rank, and the random state advances alike), so a worker takes the
inputs that are still on the device from its own previous step, as rank 0 does.
"""
from __future__ import annotations

import msgspec
import numpy as np
import torch

from sageinfer.executor.offload_mirror import OffloadOp
from sageinfer.sampling_params import SamplingParams


class NewRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


class ScheduledRequest(msgspec.Struct, array_like=True):
    request_id: str
    num_new_tokens: int
    num_computed_tokens: int
    token_start: int          # the worker's tokens from here on are replaced by `tokens`
    tokens: list[int]         # -1 marks a token still on the device (async scheduling)
    blocks_reset: bool        # `block_ids` replaces the worker's list (after preemption) instead of extending it
    block_ids: list[int]
    num_pending_tokens: int
    last_sampled_row: int
    grammar_bitmask: bytes | None = None  # the tokens its grammar allows at this step's draw (packed int32)


class StepMessage(msgspec.Struct, tag=True):
    new: list[NewRequest]
    finished: list[str]
    scheduled: list[ScheduledRequest]
    use_prev_tokens: bool     # the step takes device-side inputs from the previous step's samples
    offload: list[OffloadOp] = []  # the offload tier's copies rank 0 made since the last step, in order
    defer_token_masks: bool = False  # the step's draw waits for a TokenMasks message


class MaskRow(msgspec.Struct, array_like=True):
    request_id: str
    token_start: int          # the worker's tokens from here on are replaced by `tokens` (all now known)
    tokens: list[int]
    grammar_bitmask: bytes | None


class TokenMasks(msgspec.Struct, tag=True):
    """What a deferred draw reads of the tokens (bad words, grammars), for the requests whose draw does."""
    rows: list[MaskRow]


class Shutdown(msgspec.Struct, tag=True):
    pass


class WarmUp(msgspec.Struct, tag=True):
    """Run the long-prompt warm-up chunks rank 0 chose (ModelRunner.long_prefill_warm_up)."""
    first: int
    rest: int


WorkerCommand = StepMessage | TokenMasks | Shutdown | WarmUp


class StepMessageBuilder:
    """Rank 0's side: what each request's mirror on the workers already holds."""

    def __init__(self):
        # request id -> [request, tokens known to the workers, blocks sent, preemptions seen]
        self._sent: dict[str, list] = {}

    def build(self, scheduled: list, use_prev_tokens: bool, offload: list | None = None,
              defer_token_masks: bool = False) -> StepMessage:
        finished = [rid for rid, entry in self._sent.items() if entry[0].is_finished]
        for rid in finished:
            del self._sent[rid]
        new, items = [], []
        for request, num_new in scheduled:
            entry = self._sent.get(request.request_id)
            if entry is None:
                new.append(NewRequest(request.request_id, request.prompt_token_ids, request.sampling_params))
                entry = self._sent[request.request_id] = [request, request.num_prompt_tokens, 0,
                                                          request.num_preemptions]
            _, known, num_blocks, preemptions = entry
            reset = request.num_preemptions != preemptions or len(request.block_ids) < num_blocks
            blocks = request.block_ids if reset else request.block_ids[num_blocks:]
            items.append(ScheduledRequest(request.request_id, num_new, request.num_computed_tokens, known,
                                          request.all_token_ids[known:], reset, blocks, request.num_pending_tokens,
                                          request.last_sampled_row,
                                          None if request.grammar_bitmask is None else request.grammar_bitmask.tobytes()))
            entry[1:] = [request.num_known_tokens, len(request.block_ids), request.num_preemptions]
        return StepMessage(new, finished, items, use_prev_tokens, offload or [], defer_token_masks)

    def build_token_masks(self, sampled_requests: list) -> TokenMasks:
        """For a step built with defer_token_masks, once the step before it is read: the tokens since those
        the step's message carried (the placeholders since resolved) and the grammar bitmask of each request
        whose draw reads them."""
        rows = []
        for request in sampled_requests:
            if request.sampling_params.needs_output_tokens:
                start = self._sent[request.request_id][1]
                bitmask = None if request.grammar_bitmask is None else request.grammar_bitmask.tobytes()
                rows.append(MaskRow(request.request_id, start, request.all_token_ids[start:request.num_known_tokens],
                                    bitmask))
        return TokenMasks(rows)


class WorkerRequest:
    """A worker's mirror of one sequence: the fields the model runner reads."""

    def __init__(self, new: NewRequest, eos_token_ids: set[int], device: torch.device):
        self.request_id = new.request_id
        self.prompt_token_ids = new.prompt_token_ids
        self.all_token_ids = list(new.prompt_token_ids)
        self.sampling_params = new.sampling_params
        self.eos_token_ids = eos_token_ids
        self.generator = None
        if new.sampling_params.seed is not None:  # as rank 0 seeds it, so both draw the same tokens
            self.generator = torch.Generator(device=device).manual_seed(new.sampling_params.seed)
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.last_sampled_row = -1
        self.grammar_bitmask = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    def update(self, s: ScheduledRequest) -> None:
        del self.all_token_ids[s.token_start:]
        self.all_token_ids += s.tokens
        if s.blocks_reset:
            self.block_ids = list(s.block_ids)
        else:
            self.block_ids += s.block_ids
        self.num_computed_tokens = s.num_computed_tokens
        self.num_pending_tokens = s.num_pending_tokens
        self.last_sampled_row = s.last_sampled_row
        self.grammar_bitmask = None if s.grammar_bitmask is None else np.frombuffer(s.grammar_bitmask, dtype=np.int32)

    def update_masks(self, row: MaskRow) -> None:
        del self.all_token_ids[row.token_start:]
        self.all_token_ids += row.tokens
        self.num_pending_tokens = 0  # every token the draw follows is known (the drawn one is not here yet)
        self.grammar_bitmask = None if row.grammar_bitmask is None else np.frombuffer(row.grammar_bitmask,
                                                                                       dtype=np.int32)


class WorkerRequests:
    """A worker's mirrors, updated by each step message; returns the step's (request, tokens) batch."""

    def __init__(self, eos_token_ids: set[int], device: torch.device):
        self.eos_token_ids, self.device = eos_token_ids, device
        self.requests: dict[str, WorkerRequest] = {}

    def apply(self, message: StepMessage) -> list[tuple[WorkerRequest, int]]:
        for rid in message.finished:
            self.requests.pop(rid, None)
        for new in message.new:
            self.requests[new.request_id] = WorkerRequest(new, self.eos_token_ids, self.device)
        scheduled = []
        for s in message.scheduled:
            request = self.requests[s.request_id]
            request.update(s)
            scheduled.append((request, s.num_new_tokens))
        return scheduled

    def apply_masks(self, message: TokenMasks) -> None:
        for row in message.rows:
            self.requests[row.request_id].update_masks(row)
