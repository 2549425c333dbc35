"""Who runs this step: continuous batching with chunked prefill and preemption by recomputation.

Policy, in one screen:
1. Running requests first, in arrival order: each asks for all its uncomputed tokens (1 for a
   decode, the next chunk for a prefill), capped by the step's token budget. If the KV cache can't
   hold them, the most recently arrived running request is preempted (blocks freed, progress reset;
   its generated tokens are kept and recomputed later as part of its prompt) until it fits.
2. Then waiting requests, strictly FCFS, while budget, max_num_seqs and blocks allow, and while the
   running requests keep room to grow by admission_lookahead_tokens each (a preempted request's
   recomputation is pure waste; running a little below full memory costs less). A prefix-cache
   hit counts as computed; blocks that fill up in this step are findable at once, so requests with
   a common prefix admitted in the same step compute it once. Without chunked prefill a prompt must
   fit the budget whole.
Preempted requests go back to the front of the queue, so nobody starves.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sageinfer.config import EngineConfig
from sageinfer.engine.request import Request, RequestStatus
from sageinfer.kv_cache.manager import KVCacheManager


@dataclass
class SchedulerOutput:
    # (request, number of new tokens computed this step), in batch order
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending_tokens and request.num_output_tokens >= request.max_output_tokens:
                i += 1  # finishes once its in-flight token is read: computing more would be wasted
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                self.kv.cache_full_blocks(request, request.num_computed_tokens + num_new)
                budget -= num_new
                i += 1
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _growth_blocks(self, request, num_tokens: int) -> int:
        """Blocks a request needs beyond those for num_tokens to go on for the admission lookahead."""
        lookahead = self.config.admission_lookahead_tokens
        target = min(request.num_prompt_tokens + request.max_output_tokens, request.num_tokens + lookahead)
        bs = self.kv.block_size
        return max(0, -(-target // bs) - -(-num_tokens // bs))

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        if not self.waiting:
            return budget
        # Blocks held back for the running requests' next tokens (their slots for this step are taken).
        reserve = 0
        if self.config.admission_lookahead_tokens:
            this_step = {id(r): n for r, n in out.scheduled}
            reserve = sum(self._growth_blocks(r, r.num_computed_tokens + this_step.get(id(r), 0)) for r in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._waits_for_leader(request):
                break
            fresh = request.num_computed_tokens == 0 and not request.block_ids
            # Prompt logprobs need every prompt position computed: no prefix-cache hit for those.
            wants_prompt = request.sampling_params.prompt_logprobs is not None
            hit = self.kv.get_computed_blocks(request) if fresh and not wants_prompt else None
            num_hit = hit.num_tokens if hit else 0
            num_new = request.num_tokens - request.num_computed_tokens - num_hit
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            upto = request.num_computed_tokens + num_hit + num_new
            growth = self._growth_blocks(request, upto) if self.config.admission_lookahead_tokens else 0
            # With nothing running, a request too large for its lookahead still gets its turn.
            if not self.kv.allocate_slots(request, num_new, hit, reserve=reserve + growth if self.running else 0):
                break
            reserve += growth
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:  # first admission, not a resume
                self.kv.record_prefix_query(request.num_prompt_tokens, num_hit)
                request.num_cached_tokens = num_hit
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens += num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            self.kv.cache_full_blocks(request, request.num_computed_tokens + num_new)
            budget -= num_new
        return budget

    @staticmethod
    def _waits_for_leader(request: Request) -> bool:
        """n > 1 siblings start once the first sample has computed (and cached) the prompt."""
        leader = request.leader
        return (leader is not None and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens
                and leader.status == RequestStatus.RUNNING)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress of what ran (its full blocks were registered when it was scheduled)."""
        for request, num_new in out.scheduled:
            request.num_computed_tokens += num_new

    def finish(self, request: Request, reason: str, stop_reason=None) -> None:
        """Finish (or abort) a request wherever it is and free its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish(reason, stop_reason)
        if request.block_ids:
            self.kv.free(request)
