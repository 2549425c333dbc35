"""Offload tier: KV blocks evicted from the device cache kept in a (pinned) host pool, LRU.

The store mirrors the device cache's per-layer layout with one row per host slot. Copies are batched:
blocks whose host slots are consecutive move as one run, i.e. per layer and tensor (values, and int8
scales where present) one gather on the device and one copy across, whatever the number of blocks.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from sageinfer.transport.base import KVConnector


class HostOffloadConnector(KVConnector):
    def __init__(self, kv_caches: list, num_host_blocks: int, platform):
        if num_host_blocks < 1:
            raise ValueError(f"the offload tier needs at least one block of host memory, got {num_host_blocks}")
        self.kv_caches = kv_caches
        self.num_host_blocks = num_host_blocks
        self.platform = platform
        self.stores = []  # per layer: the tensors of LayerKVCache that hold data, host side
        for cache in kv_caches:
            tensors = [t for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]
            self.stores.append([platform.host_buffer((num_host_blocks, *t.shape[1:]), t.dtype) for t in tensors])
        self.slots: OrderedDict[int, int] = OrderedDict()  # key -> host slot, least recently used first
        self.free_slots = list(range(num_host_blocks - 1, -1, -1))
        self.saved_blocks = 0
        self.loaded_blocks = 0
        # Saves run on their own stream, overlapping the step in flight: the blocks they read are
        # cached and free, and were freed before that step was launched, so it does not write them
        # (a block freed later may still take its writes: then the save waits for it,
        # after_launched). The next step waits for the saves before reusing the blocks.
        # Loads stay on the compute stream: a block freed moments ago may still take an in-flight
        # write (the wasted token of a request that just finished).
        self.copy_stream = platform.stream()
        self.loads_done = None  # a save may overwrite a host slot only after earlier loads read it
        # Keys gained and dropped, in order, for KV events (None: nobody listens): ("stored_host",
        # key), ("removed_host", key); the cache manager shares its list here.
        self.events: list[tuple] | None = None

    def _device_tensors(self, layer: int) -> list[torch.Tensor]:
        cache = self.kv_caches[layer]
        return [t for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]

    def contains_prefix(self, keys: list[int]) -> int:
        n = 0
        for key in keys:
            if key not in self.slots:
                break
            n += 1
        return n

    def _take_slot(self, protected: set[int]) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        for key in self.slots:  # least recently used that no pending load needs
            if key not in protected:
                if self.events is not None:
                    self.events.append(("removed_host", key))
                return self.slots.pop(key)
        return None

    def save(self, keys: list[int], block_ids: list[int], protected: set[int], after_launched: bool = False) -> None:
        launched = self.platform.record_event() if after_launched else None
        with self.platform.copy_stream_context(self.copy_stream):
            if launched is not None:
                self.platform.wait_event(launched)
            if self.loads_done is not None:
                self.platform.wait_event(self.loads_done)
            self._save(keys, block_ids, protected)
        if self.copy_stream is not None:
            self.platform.wait_for(self.copy_stream)

    def _save(self, keys: list[int], block_ids: list[int], protected: set[int]) -> None:
        moves = {}  # host slot -> device block; a slot retaken within the batch keeps its last block
        for key, block_id in zip(keys, block_ids):
            if key in self.slots:
                self.slots.move_to_end(key)
                continue
            slot = self._take_slot(protected)
            if slot is None:
                break
            self.slots[key] = slot
            moves[slot] = block_id
            if self.events is not None:
                self.events.append(("stored_host", key))
        for start, blocks in self._runs(list(moves.items())):
            for layer, store in enumerate(self.stores):
                for host, device in zip(store, self._device_tensors(layer)):
                    host[start:start + len(blocks)].copy_(device.index_select(0, blocks), non_blocking=True)
        self.saved_blocks += len(moves)

    def load(self, keys: list[int], block_ids: list[int]) -> None:
        moves = []
        for key, block_id in zip(keys, block_ids):
            moves.append((self.slots[key], block_id))
            self.slots.move_to_end(key)
        for start, blocks in self._runs(moves):
            for layer, store in enumerate(self.stores):
                for host, device in zip(store, self._device_tensors(layer)):
                    staged = host[start:start + len(blocks)].to(device.device, non_blocking=True)
                    device.index_copy_(0, blocks, staged)
        self.loaded_blocks += len(moves)
        self.loads_done = self.platform.record_event()

    def _runs(self, moves: list[tuple[int, int]]):
        """(first host slot, device block ids as a device tensor) per run of consecutive host slots."""
        moves = sorted(moves)
        i = 0
        while i < len(moves):
            j = i + 1
            while j < len(moves) and moves[j][0] == moves[j - 1][0] + 1:
                j += 1
            ids = np.array([block for _, block in moves[i:j]], dtype=np.int64)
            yield moves[i][0], self.platform.to_device(ids, self.kv_caches[0].k.device)
            i = j
