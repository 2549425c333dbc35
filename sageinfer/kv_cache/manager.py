"""Which KV blocks each request holds; prefix-cache lookups and registration of full blocks."""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Sequence

from sageinfer.kv_cache.block_pool import BlockPool


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 chained over the parent key, so equal blocks hash alike only under equal prefixes.
    A cryptographic hash because a prompt crafted to collide with another tenant's prefix would be
    served that tenant's cache (Python's hash() is not built to resist that); and a key that any
    process or language recomputes from the tokens, as PD transfer and cache-aware routing need.
    About 1 us per block of 16 tokens."""
    return hashlib.sha256((parent_hash or b"") + array("q", token_ids).tobytes()).digest()


def hash_blocks(parent_hash: bytes | None, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """hash_block chained over each whole block of token_ids in turn (a trailing partial block is not
    hashed): the tokens are packed once, not once a block (a 2,048-token prompt on a 2-core CPU: blocks of
    16 432 -> 304 us, of 64 134 -> 112)."""
    width = block_size * 8  # bytes of a block: int64 tokens, as hash_block packs them
    packed = array("q", token_ids[:len(token_ids) // block_size * block_size]).tobytes()
    hashes, parent = [], parent_hash or b""
    for start in range(0, len(packed), width):
        parent = hashlib.sha256(parent + packed[start:start + width]).digest()
        hashes.append(parent)
    return hashes


@dataclass
class PrefixHit:
    """The cached prefix of a request: device blocks that hold it, then blocks to bring back from
    the offload tier (by hash) into fresh device blocks."""
    blocks: list[int] = field(default_factory=list)
    offloaded: list[int] = field(default_factory=list)
    block_size: int = 0

    @property
    def num_tokens(self) -> int:
        return (len(self.blocks) + len(self.offloaded)) * self.block_size


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, connector=None):
        """connector: a transport.KVConnector holding evicted blocks (the offload tier), or None."""
        if connector is not None and not enable_caching:
            raise ValueError("the KV offload tier needs prefix caching (blocks are found by their hash)")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.connector = connector
        self.pending_loads: list[tuple[int, int]] = []  # (block hash, device block) to fill before the step
        self.offload_hit_tokens = 0
        self.pool = BlockPool(num_blocks, enable_caching)
        # Prefix-cache statistics over admitted requests.
        self.prefix_queries = 0
        self.prefix_hits = 0

    def _update_hashes(self, request) -> None:
        bs = self.block_size
        done = len(request.block_hashes)
        known = request.num_known_tokens  # placeholders of in-flight steps are never hashed
        if (done + 1) * bs <= known:
            request.block_hashes += hash_blocks(request.block_hashes[-1] if done else None,
                                                request.all_token_ids[done * bs:known], bs)

    def get_computed_blocks(self, request) -> PrefixHit:
        """Longest cached prefix of the request, in whole blocks; never all of its tokens, since
        the last token must be computed to get logits."""
        hit = PrefixHit(block_size=self.block_size)
        if not self.enable_caching:
            return hit
        self._update_hashes(request)
        candidates = request.block_hashes[:(request.num_tokens - 1) // self.block_size]
        for block_hash in candidates:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hit.blocks.append(block_id)
        if self.connector is not None:
            rest = candidates[len(hit.blocks):]
            hit.offloaded = rest[:self.connector.contains_prefix(rest)]
        return hit

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def _blocks_needed(self, request, num_new_tokens: int, hit: PrefixHit | None) -> int:
        hit_tokens = hit.num_tokens if hit else 0
        held = len(request.block_ids) + (len(hit.blocks) if hit else 0)
        total = -(-(request.num_computed_tokens + hit_tokens + num_new_tokens) // self.block_size)
        return max(0, total - held)

    def can_allocate(self, request, num_new_tokens: int, hit: PrefixHit | None = None, reserve: int = 0) -> bool:
        """Whether the slots fit and leave at least reserve blocks free."""
        needed = self._blocks_needed(request, num_new_tokens, hit)
        # Cached blocks that sit in the free queue stop being free once touched.
        reclaimed = sum(1 for b in hit.blocks if self.pool.blocks[b].ref_count == 0) if hit else 0
        return needed + reserve <= self.pool.num_free_blocks - reclaimed

    def allocate_slots(self, request, num_new_tokens: int, hit: PrefixHit | None = None, reserve: int = 0) -> bool:
        """Room for num_new_tokens more tokens after the computed ones (and after a prefix hit,
        which the caller then counts as computed), leaving at least reserve blocks free; False,
        changing nothing, if there is none."""
        if not self.can_allocate(request, num_new_tokens, hit, reserve):
            return False
        needed = self._blocks_needed(request, num_new_tokens, hit)
        if hit and hit.blocks:
            self.pool.touch(list(hit.blocks))
            request.block_ids.extend(hit.blocks)
            request.num_registered_blocks = len(request.block_ids)
        new_blocks = self.pool.allocate(needed)
        request.block_ids.extend(new_blocks)
        if hit and hit.offloaded:  # the first new blocks are filled from the offload tier
            loaded = new_blocks[:len(hit.offloaded)]
            self.pending_loads += zip(hit.offloaded, loaded)
            self.offload_hit_tokens += len(hit.offloaded) * self.block_size
            # Findable at once: a request admitted later in this step shares them instead of loading
            # its own copy (the loads are enqueued before any step that reads them).
            for i, (block_id, block_hash) in enumerate(zip(loaded, hit.offloaded), start=len(hit.blocks)):
                self._cache_block(request, i, block_id, block_hash)
            request.num_registered_blocks = len(hit.blocks) + len(hit.offloaded)
        return True

    def flush_transfers(self) -> None:
        """Enqueue this step's copies before its forward: evicted blocks out first (a block may be
        evicted and refilled in the same step), then offloaded blocks back in."""
        if self.connector is None:
            self.pool.evicted.clear()
            return
        if self.pool.evicted:
            keys, blocks = zip(*self.pool.evicted)
            self.pool.evicted.clear()
            # A block freed while the last launched step was in flight may still be written by it.
            after_launched = any(b in self.pool.freed_since_launch for b in blocks)
            self.connector.save(list(keys), list(blocks), protected={k for k, _ in self.pending_loads},
                                after_launched=after_launched)
        if self.pending_loads:
            keys, blocks = zip(*self.pending_loads)
            self.pending_loads.clear()
            self.connector.load(list(keys), list(blocks))

    def step_launched(self) -> None:
        """Called once a step is enqueued: blocks freed from now on may still be written by it."""
        self.pool.freed_since_launch.clear()

    def cache_full_blocks(self, request, num_tokens: int | None = None) -> None:
        """Register the request's blocks whose tokens are all computed, for later prefix hits.
        num_tokens: count tokens up to there as computed; the scheduler passes the end of the chunk
        it just scheduled, so a request admitted later in the same step already shares those blocks
        (every layer writes the whole step's KV before it attends, so they are filled in time)."""
        if not self.enable_caching:
            return
        self._update_hashes(request)
        computed = request.num_computed_tokens if num_tokens is None else num_tokens
        num_full = min(computed // self.block_size, len(request.block_hashes))
        for i in range(request.num_registered_blocks, num_full):
            self._cache_block(request, i, request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def _cache_block(self, request, index: int, block_id: int, block_hash: bytes) -> None:
        """Register the request's block `index`; a KV event when the index gains it."""
        if self.pool.cache_block(block_id, block_hash) and self.pool.events is not None:
            bs = self.block_size
            parent = request.block_hashes[index - 1] if index else None
            self.pool.events.append(("stored", block_hash, parent, request.all_token_ids[index * bs:(index + 1) * bs]))

    def enable_events(self) -> None:
        """Start recording what enters and leaves the prefix index and the offload tier (take_events
        drains it); both write one list, so the order holds across them."""
        if self.enable_caching:
            self.pool.events = []
            if self.connector is not None:
                self.connector.events = self.pool.events

    def take_events(self) -> list[tuple]:
        """The changes since the last call, in order: ("stored", hash, parent hash, tokens),
        ("removed", hash), ("cleared",) of the device cache; ("stored_host", hash), ("removed_host",
        hash) of the offload tier."""
        events = self.pool.events
        if not events:
            return []
        taken = list(events)
        events.clear()
        return taken

    def free(self, request) -> None:
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_registered_blocks = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
