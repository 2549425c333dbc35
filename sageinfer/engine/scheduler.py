"""Who runs this step: continuous batching with chunked prefill and preemption by recomputation.

Policy, in one screen:
1. Running requests first, in arrival order: each asks for all its uncomputed tokens (1 for a
   decode, the next chunk for a prefill), capped by the step's token budget. If the KV cache can't
   hold them, the most recently arrived running request is preempted (blocks freed, progress reset;
   its generated tokens are kept and recomputed later as part of its prompt) until it fits.
2. Then waiting requests, strictly in line, while budget, max_num_seqs and blocks allow, and while the
   running requests keep room to grow by admission_lookahead_tokens each (a preempted request's
   recomputation is pure waste; running a little below full memory costs less), less the blocks that
   requests reaching their max_tokens within the lookahead give back first. A prefix-cache
   hit counts as computed; blocks that fill up in this step are findable at once, so requests with
   a common prefix admitted in the same step compute it once. Without chunked prefill a prompt must
   fit the budget whole. With long_prefill_token_threshold, while requests wait, each prefill takes at
   most that many tokens a step, leaving the rest of the budget to the prompts behind it.
Preempted requests go back to the front of the queue, so nobody starves. The line is arrival order
(scheduling_policy "fcfs"), or with "priority" a request's priority (lowest value first), then arrival:
running requests are then taken most urgent first, so the one preempted is the least urgent and the
latest of its priority. A waiting request never preempts a running one.
3. Prefill/decode separation (a kv_transfer connector): a request whose prompt KV is on a prefill
   instance is admitted into blocks for it and waits there, out of the batch, while it arrives; then
   it runs, computing only the prompt's last tokens. A load that fails makes it compute the prompt
   here. On the prefill side, a finished request's blocks stay held while the connector sends them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from sageinfer.config import EngineConfig
from sageinfer.engine.admission_reserve import ends_within, reserve_blocks
from sageinfer.engine.request import Request, RequestStatus
from sageinfer.engine.request_queue import make_queue, priority_key
from sageinfer.kv_cache.manager import KVCacheManager, PrefixHit

logger = logging.getLogger(__name__)


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
    def __init__(self, config: EngineConfig, kv_manager: KVCacheManager, kv_transfer=None):
        """kv_transfer: a transport.remote_kv.RemoteKVConnector (prefill/decode separation), or None."""
        self.config = config
        self.kv = kv_manager
        self.kv_transfer = kv_transfer
        self.waiting = make_queue(config.scheduling_policy)
        self.by_priority = config.scheduling_policy == "priority"
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.loading: dict[str, Request] = {}  # consumer: prompt KV arriving into their blocks
        self.sending: dict[str, Request] = {}  # producer: finished, blocks held until their KV is read
        self.num_remote_kv_loads = 0
        self.num_remote_kv_failures = 0
        self.num_remote_kv_tokens = 0
        self.remote_kv_load_seconds = 0.0  # loads that succeeded, from their start to their end
        self.remote_kv_send_seconds = 0.0  # blocks held for a decode instance: from the offer until freed

    def add_request(self, request: Request) -> None:
        self.waiting.add(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def has_pending_transfers(self) -> bool:
        return bool(self.loading or self.sending)

    def schedule(self) -> SchedulerOutput:
        if self.kv_transfer is not None:
            self._poll_transfers()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.by_priority:  # the most urgent first: the last in line is the one preempted
            self.running.sort(key=priority_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending_tokens and request.num_output_tokens >= request.max_output_tokens:
                i += 1  # finishes once its in-flight token is read: computing more would be wasted
                continue
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget, bool(self.waiting))
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

    def _chunk(self, num_new: int, budget: int, others_wait: bool) -> int:
        """Tokens a request computes this step: what it has left within the budget, and no more than
        long_prefill_token_threshold of a prefill while others wait for the rest of the budget."""
        limit = self.config.long_prefill_token_threshold
        if limit and others_wait and self.config.enable_chunked_prefill:
            num_new = min(num_new, limit)
        return min(num_new, budget)

    def _growth_blocks(self, request, num_tokens: int) -> int:
        """Blocks a request needs beyond those for num_tokens to go on for the admission lookahead."""
        lookahead = self.config.admission_lookahead_tokens
        target = min(request.num_prompt_tokens + request.max_output_tokens, request.num_tokens + lookahead)
        bs = self.kv.block_size
        return max(0, -(-target // bs) - -(-num_tokens // bs))

    def _running_reserve(self, out: SchedulerOutput) -> int:
        """Blocks held back for the running requests to grow by the lookahead, less what those that reach their
        max_tokens within it give back first (engine/admission_reserve.py)."""
        this_step = {id(r): n for r, n in out.scheduled}
        lookahead = self.config.admission_lookahead_tokens
        blocks = self.kv.pool.blocks
        tokens, ends, held, decoding, freed = [], [], [], [], []
        for r in self.running:
            tokens.append(r.num_tokens)
            ends.append(min(r.num_prompt_tokens + r.max_output_tokens, 1 << 60))
            held.append(len(r.block_ids))
            decoding.append(r.num_computed_tokens + this_step.get(id(r), 0) >= r.num_prompt_tokens)
            # what its end frees, counted only where it may end: blocks no other request holds
            freed.append(sum(1 for b in r.block_ids if blocks[b].ref_count == 1)
                         if ends_within(tokens[-1], ends[-1], decoding[-1], lookahead) else 0)
        return reserve_blocks(np.array(tokens, np.int64), np.array(ends, np.int64), np.array(held, np.int64),
                              np.array(decoding, bool), lookahead, self.kv.block_size,
                              freed_blocks=np.array(freed, np.int64))

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        if not self.waiting:
            return budget
        # Blocks held back for the running requests' next tokens (their slots for this step are taken).
        reserve = 0
        if self.config.admission_lookahead_tokens:
            reserve = self._running_reserve(out)
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if self._waits_for_leader(request):
                break
            fresh = request.num_computed_tokens == 0 and not request.block_ids
            # Prompt logprobs need every prompt position computed: no prefix-cache hit for those.
            wants_prompt = request.sampling_params.prompt_logprobs is not None
            hit = self.kv.get_computed_blocks(request) if fresh and not wants_prompt else None
            num_hit = hit.num_tokens if hit else 0
            if request.remote_kv is not None and fresh:
                started = self._start_remote_load(request, hit, reserve)
                if started is None:
                    break  # no room for its blocks yet
                if started:
                    continue
            num_new = request.num_tokens - request.num_computed_tokens - num_hit
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = self._chunk(num_new, budget, len(self.waiting) > 1)
            upto = request.num_computed_tokens + num_hit + num_new
            growth = self._growth_blocks(request, upto) if self.config.admission_lookahead_tokens else 0
            # With nothing running, a request too large for its lookahead still gets its turn.
            if not self.kv.allocate_slots(request, num_new, hit, reserve=reserve + growth if self.running else 0):
                break
            reserve += growth
            self.waiting.pop()
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

    def _start_remote_load(self, request: Request, hit: PrefixHit | None, reserve: int) -> bool | None:
        """Admit a request whose prompt KV is on a prefill instance into blocks for it and start the
        load (True); False if there is nothing to load (it goes on as any request); None if its blocks
        don't fit now. Whole blocks only, and never the last prompt token (its logits are needed)."""
        bs = self.kv.block_size
        offered = int(request.remote_kv.get("remote_num_tokens") or 0)
        usable = min(offered, request.num_prompt_tokens - 1) // bs * bs
        local = PrefixHit(blocks=list(hit.blocks), block_size=bs) if hit else PrefixHit(block_size=bs)
        start = local.num_tokens
        if usable <= start:
            request.remote_kv = None
            return False
        if not self.kv.allocate_slots(request, usable - start, local, reserve=reserve if self.running else 0):
            return None
        self.waiting.pop()
        if request.status == RequestStatus.WAITING:
            self.kv.record_prefix_query(request.num_prompt_tokens, start)
            request.num_cached_tokens = start
            request.first_scheduled_time = time.monotonic()
        request.num_computed_tokens = start
        try:
            self.kv_transfer.start_load(request.request_id, request.remote_kv,
                                        request.block_ids[start // bs:usable // bs], start)
        except Exception as exc:  # noqa: BLE001 - this request computes its prompt instead
            self._remote_load_failed(request, f"{type(exc).__name__}: {exc}")
            return True
        request.remote_kv_tokens = usable
        request.kv_transfer_started = time.monotonic()
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.loading[request.request_id] = request
        return True

    def _remote_load_failed(self, request: Request, reason: str) -> None:
        logger.warning("request %s: its prompt's KV could not be loaded from the prefill instance (%s); "
                       "computing it here", request.request_id, reason)
        self.num_remote_kv_failures += 1
        self.kv.free(request)
        request.remote_kv = None
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED  # admitted again from the front, as a resumed request
        self.waiting.add_front(request)

    def _poll_transfers(self) -> None:
        for request_id in self.kv_transfer.poll_sent():
            request = self.sending.pop(request_id, None)
            if request is not None:
                self.remote_kv_send_seconds += time.monotonic() - request.kv_transfer_started
                if request.block_ids:
                    self.kv.free(request)
        for request_id, error in self.kv_transfer.poll_loaded():
            request = self.loading.pop(request_id, None)
            if request is None:
                continue
            if request.is_finished:  # aborted while its KV arrived
                self.kv.free(request)
            elif error is not None:
                self._remote_load_failed(request, error)
            else:
                self.num_remote_kv_loads += 1
                self.num_remote_kv_tokens += request.remote_kv_tokens - request.num_computed_tokens
                self.remote_kv_load_seconds += time.monotonic() - request.kv_transfer_started
                request.num_computed_tokens = request.remote_kv_tokens
                request.remote_kv = None
                request.status = RequestStatus.RUNNING
                self.kv.cache_full_blocks(request)  # the loaded blocks serve later prefix hits too
                self.running.append(request)  # its remaining prompt tokens run as a prefill chunk

    def _offers_kv(self, request: Request) -> bool:
        """Whether a decode instance will read this prompt's KV from here."""
        params = request.sampling_params.kv_transfer_params
        return (self.kv_transfer is not None and self.kv_transfer.is_producer and bool(params)
                and request.index == 0 and bool(params.get("do_remote_decode")))

    def _drop_staged(self, request: Request) -> None:
        """Before a producer's prefill frees its blocks without offering them (preempted, aborted)."""
        if self._offers_kv(request):
            self.kv_transfer.drop_staged(request.request_id)

    def _send_kv(self, request: Request) -> bool:
        """A finished prefill whose KV a decode instance will read: hand it to the connector and say
        whether its blocks stay held."""
        if not self._offers_kv(request) or request.finish_reason not in ("stop", "length"):
            self._drop_staged(request)
            return False
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        try:
            held, request.kv_transfer_params_out = self.kv_transfer.send(request.request_id, request.block_ids,
                                                                         num_tokens)
        except Exception:  # noqa: BLE001 - the decode instance will compute the prompt itself
            logger.exception("request %s: its KV could not be offered for transfer", request.request_id)
            self._drop_staged(request)
            return False
        if held:
            request.kv_transfer_started = time.monotonic()
            self.sending[request.request_id] = request
        return held

    @staticmethod
    def _waits_for_leader(request: Request) -> bool:
        """n > 1 siblings start once the first sample has computed (and cached) the prompt."""
        leader = request.leader
        return (leader is not None and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens
                and leader.status == RequestStatus.RUNNING)

    def _preempt(self, request: Request) -> None:
        self._drop_staged(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(request)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress of what ran (its full blocks were registered when it was scheduled)."""
        for request, num_new in out.scheduled:
            request.num_computed_tokens += num_new

    def stage_kv(self, out: SchedulerOutput):
        """Before a step launches: the prompts it computes whose KV a decode instance will read may
        start to leave layer by layer (the connector decides). Returns what the model calls after each
        layer, or None."""
        if self.kv_transfer is None or not self.kv_transfer.is_producer:
            return None
        parts = [(r.request_id, r.block_ids, r.num_computed_tokens + n, r.num_prompt_tokens) for r, n in out.scheduled
                 if r.num_computed_tokens < r.num_prompt_tokens and self._offers_kv(r)]
        if not parts:
            return None
        try:
            return self.kv_transfer.stage_step(parts)
        except Exception:  # noqa: BLE001 - the KV goes once each prefill ends instead
            logger.exception("staging KV layer by layer failed for requests %s", [p[0] for p in parts])
            return None

    def finish(self, request: Request, reason: str, stop_reason=None) -> None:
        """Finish (or abort) a request wherever it is and free its blocks."""
        if request.is_finished:
            return
        if request.request_id in self.loading:
            request.finish(reason, stop_reason)
            if self.kv_transfer.cancel_load(request.request_id):
                del self.loading[request.request_id]
                self.kv.free(request)
            return  # else its blocks are freed once the transfer writing them has ended
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish(reason, stop_reason)
        if request.block_ids and not self._send_kv(request):
            self.kv.free(request)
