"""Prefill/decode separation's connector: a request's prompt KV leaves a prefill instance (producer)
and arrives in a decode instance's blocks (consumer). The scheduler drives it:

  producer   send(request, blocks, tokens) when a request marked do_remote_decode finishes: returns
             whether its blocks stay held, and the kv_transfer_params the decode instance needs;
             poll_sent() names requests whose held blocks may now be freed (read, or given up on).
  consumer   start_load(request, params, blocks, first_token) into blocks the scheduler allocated
             (the request waits meanwhile, holding them); poll_loaded() names loads that ended, with
             None or the reason they failed (the request then computes its prompt itself);
             cancel_load(request) when it is aborted: True if its blocks may be freed at once.

Backends: ipc_connector (same host, device to device), shm_connector (same host, staged in shared host
memory), nixl_connector (NIXL), torch_dist_connector (torch.distributed point-to-point).
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from sageinfer.transport.kv_pairing import CONSUMER_ROLES, PRODUCER_ROLES

logger = logging.getLogger(__name__)


def kv_tensors(kv_caches: list) -> list[torch.Tensor]:
    """Every tensor of the paged cache that holds data, layer by layer: K, V (and int8 scales)."""
    out = []
    for cache in kv_caches:
        out += [t for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]
    return out


def kv_layout(kv_caches: list) -> dict:
    """What a peer's cache must equal for its KV to be usable here: per tensor the dtype and the shape
    of one token's entry, and the per-tensor FP8 scales."""
    return {"tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape[2:])] for t in kv_tensors(kv_caches)],
            "fp8_scales": [float(c.fp8_scale) for c in kv_caches]}


def layout_mismatch(ours: dict, theirs: dict | None) -> str | None:
    """Why a peer's KV can't be used here, or None."""
    if not isinstance(theirs, dict):
        return "kv_transfer_params carry no KV layout"
    if theirs.get("tensors") != ours["tensors"]:
        return (f"the prefill instance's KV cache differs (layers, KV heads, head size or kv_cache_dtype): "
                f"{len(theirs.get('tensors') or [])} tensors {(theirs.get('tensors') or [None])[0]} vs "
                f"{len(ours['tensors'])} tensors {ours['tensors'][0]} here")
    if theirs.get("fp8_scales") != ours["fp8_scales"]:
        return "the prefill instance's FP8 KV scales differ from this instance's"
    return None


class RemoteKVConnector:
    name = ""

    def __init__(self, config: dict, kv_caches: list, block_size: int, platform):
        self.config = config
        self.role = config["kv_role"]
        self.engine_id = config["engine_id"]
        self.extra = config["kv_connector_extra_config"]
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.platform = platform
        self.layout = kv_layout(kv_caches)
        # Held KV that no decode instance read is freed after abort_timeout_s; a load that has not
        # ended after load_timeout_s is given up (the request computes its prompt).
        self.abort_timeout = float(self.extra.get("abort_timeout_s", 120))
        self.load_timeout = float(self.extra.get("load_timeout_s", 60))
        self.sends_via: Counter[str] = Counter()  # prompts offered, by the path their KV takes (metrics)

    @property
    def is_producer(self) -> bool:
        return self.role in PRODUCER_ROLES

    @property
    def is_consumer(self) -> bool:
        return self.role in CONSUMER_ROLES

    def description(self) -> dict:
        """What this instance says of its KV transfer to a PD proxy (kv_pairing.pairing_mismatch)."""
        return {"kv_connector": self.name, "kv_role": self.role, "engine_id": self.engine_id,
                "block_size": self.block_size, "layout": self.layout}

    def offer_mismatch(self, params: dict, first_token: int, num_tokens: int) -> str | None:
        """Why a prefill instance's offer can't fill these tokens here, or None."""
        reason = layout_mismatch(self.layout, params.get("remote_layout"))
        if reason is None and first_token + num_tokens > int(params.get("remote_num_tokens") or 0):
            reason = "the prefill instance offers fewer tokens than asked for"
        return reason

    def base_params(self, request_id: str, num_tokens: int) -> dict:
        return {"do_remote_prefill": True, "kv_connector": self.name, "remote_engine_id": self.engine_id,
                "remote_request_id": request_id, "remote_num_tokens": num_tokens,
                "remote_block_size": self.block_size, "remote_layout": self.layout}

    # ---- producer ----
    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        raise NotImplementedError

    def stage_step(self, parts: list[tuple[str, list[int], int, int]]):
        """Prompts that will be sent compute in the step about to launch: parts are (request, its block
        ids, its tokens computed once the step has run, its prompt's length). A connector that moves KV
        while the prompt computes returns what the model calls after each layer (its index), else None."""
        return None

    def drop_staged(self, request_id: str) -> None:
        """A prompt staged early will not be sent (preempted, aborted): before its blocks are freed,
        copies still reading them end, and what was set aside for it is given back."""

    def poll_sent(self) -> list[str]:
        return []

    @staticmethod
    def expire(held: dict, deadline_of, timeout: float) -> list[str]:
        """Remove and return the held requests past their deadline: no decode instance read their KV."""
        now = time.monotonic()
        gone = [request_id for request_id, entry in held.items() if now > deadline_of(entry)]
        for request_id in gone:
            logger.warning("KV of request %s was not read within %.0f s: its blocks are freed", request_id, timeout)
            del held[request_id]
        return gone

    # ---- consumer ----
    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        """Raises ValueError (the reason) if the KV can't be loaded at all."""
        raise NotImplementedError

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        return []

    def cancel_load(self, request_id: str) -> bool:
        return True

    @staticmethod
    def take_finished(loads: dict) -> list[tuple[str, str | None]]:
        """Remove and return the loads whose future (the first of each entry) has ended, each with
        None or why it failed."""
        done = []
        for request_id, (future, *_) in list(loads.items()):
            if not future.done():
                continue
            del loads[request_id]
            error = None if future.cancelled() else future.exception()
            done.append((request_id, None if error is None else f"{type(error).__name__}: {error}"))
        return done

    def close(self) -> None:
        pass
