"""Fixed-size KV blocks: reference counts, an LRU free queue, and the prefix-cache index.

A block with ref_count 0 sits in the free queue but keeps its contents and hash until it is
reused, so a later request can still hit it. Allocation takes from the queue's front (least
recently freed); requests free their blocks tail first, so leaves are evicted before their parents.
Block 0 is reserved as the null block: padded slots point at it and it is never handed out.
"""
from __future__ import annotations

from collections import OrderedDict


class KVBlock:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[0].ref_count = 1  # null block, never freed
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.evictions = 0  # cached blocks whose contents were dropped for reuse
        # (block hash, block id) of cached blocks evicted since the last drain: an offload tier
        # copies their contents out before the step that overwrites them runs.
        self.evicted: list[tuple[int, int]] = []
        # Blocks freed since the last step was launched: that step may still be writing them (an
        # aborted request's prefill chunk, a finished request's wasted token).
        self.freed_since_launch: set[int] = set()
        # Changes to the prefix index in order, for KV events (None: nobody listens): ("removed", hash)
        # here, ("stored", ...) from the manager, which knows the tokens.
        self.events: list[tuple] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.usable_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling them off the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                    self.evicted.append((block.block_hash, block_id))
                    if self.events is not None:
                        self.events.append(("removed", block.block_hash))
                block.block_hash = None
                self.evictions += 1
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each block, given in the order they should become evictable."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0 or block_id == 0:
                raise RuntimeError(f"KV block {block_id} freed more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                self.freed_since_launch.add(block_id)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Register a full block under its hash; True if the index gained the hash."""
        if not self.enable_caching:
            return False
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return False
        block.block_hash = block_hash
        return self.cached.setdefault(block_hash, block_id) == block_id

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.events is not None:
            self.events.append(("cleared",))

    def check_accounting(self) -> None:
        """Every block is either referenced or free, never both; raises on a leak or double free."""
        for block in self.blocks[1:]:
            in_queue = block.block_id in self.free_queue
            if block.ref_count < 0 or (block.ref_count == 0) != in_queue:
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count}, in free queue {in_queue}")
