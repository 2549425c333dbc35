"""One sequence's state in the engine (a request with n > 1 becomes n of these)."""
from __future__ import annotations

import enum
import time

import torch

from sageinfer.sampling_params import SamplingParams


PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # holds blocks that its prompt's KV is arriving in
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, parent_id: str, index: int, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: set[int], arrival_time: float | None = None,
                 generator: torch.Generator | None = None, priority: int = 0):
        self.request_id = request_id
        self.priority = priority  # with the priority scheduling policy: lower runs first
        self.parent_id = parent_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0      # prompt tokens served from the prefix cache at admission
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0  # leading blocks already in the prefix-cache index
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.generator = generator
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.logprobs: list = []        # per output token: {token_id: Logprob}, sampled token first
        self.cumulative_logprob = 0.0
        self.num_reported_tokens = 0    # output tokens already handed out (engines that output differences)
        # A sibling of an n > 1 request waits for this one to compute the shared prompt.
        self.leader: "Request | None" = None
        # Async scheduling: tokens sampled on the device but not yet read back sit at the tail of
        # all_token_ids as PLACEHOLDER; last_sampled_row is the row of the newest in its step's output.
        self.num_pending_tokens = 0
        self.last_sampled_row = -1
        # Most output tokens it may produce (max_tokens and the context limit); set by the engine.
        self.max_output_tokens = 1 << 62
        # Structured output: its grammar position (structured_output.grammar.RequestGrammar), and the
        # tokens allowed at its next draw (a packed bitmask row, filled before each step it samples in).
        self.grammar = None
        self.grammar_bitmask = None
        # Prefill/decode separation: the prefill instance's kv_transfer_params, while this request's
        # prompt KV is still to be loaded from there (None once loaded, or given up and computed here);
        # the tokens its load brings; and, on a prefill instance, the params handed to decode. When its
        # KV transfer (a load here, or the send of its blocks) began: monotonic seconds.
        self.remote_kv: dict | None = None
        self.remote_kv_tokens = 0
        self.kv_transfer_params_out: dict | None = None
        self.kv_transfer_started = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def num_known_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_pending_tokens

    def append_placeholder(self, row: int) -> int:
        """A token sampled on the device, to be resolved later; returns its index in all_token_ids."""
        self.all_token_ids.append(PLACEHOLDER)
        self.output_token_ids.append(PLACEHOLDER)
        self.num_pending_tokens += 1
        self.last_sampled_row = row
        return len(self.all_token_ids) - 1

    def resolve_placeholder(self, index: int, token_id: int) -> None:
        self.all_token_ids[index] = token_id
        self.output_token_ids[index - self.num_prompt_tokens] = token_id
        self.num_pending_tokens -= 1

    def truncate_after(self, index: int) -> None:
        """Drop tokens after all_token_ids[index] (placeholders of steps run past the finish)."""
        dropped = len(self.all_token_ids) - index - 1
        if dropped > 0:
            del self.all_token_ids[index + 1:]
            del self.output_token_ids[len(self.output_token_ids) - dropped:]
            self.num_pending_tokens = max(0, self.num_pending_tokens - dropped)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
