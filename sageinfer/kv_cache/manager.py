"""Which KV blocks each request holds; prefix-cache lookups and registration of full blocks."""
from __future__ import annotations

from sageinfer.kv_cache.block_pool import BlockPool


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained over the parent, so equal blocks hash alike only under equal prefixes."""
    return hash((parent_hash, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        # Prefix-cache statistics over admitted requests.
        self.prefix_queries = 0
        self.prefix_hits = 0

    def _update_hashes(self, request) -> None:
        bs = self.block_size
        tokens = request.all_token_ids
        known = request.num_known_tokens  # placeholders of in-flight steps are never hashed
        while (len(request.block_hashes) + 1) * bs <= known:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else None
            request.block_hashes.append(hash_block(parent, tuple(tokens[i * bs:(i + 1) * bs])))

    def get_computed_blocks(self, request) -> tuple[list[int], int]:
        """Longest cached prefix of the request, in whole blocks; never all of its tokens, since
        the last token must be computed to get logits."""
        if not self.enable_caching:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def _blocks_needed(self, request, num_new_tokens: int, computed_blocks) -> int:
        computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        held = len(request.block_ids) + len(computed_blocks)
        return max(0, -(-(computed + num_new_tokens) // self.block_size) - held)

    def can_allocate(self, request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        needed = self._blocks_needed(request, num_new_tokens, computed_blocks)
        # Cached blocks that sit in the free queue stop being free once touched.
        reclaimed = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_count == 0)
        return needed <= self.pool.num_free_blocks - reclaimed

    def allocate_slots(self, request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Room for num_new_tokens more tokens after the computed ones (and after computed_blocks,
        a prefix hit that the caller then counts as computed); False, changing nothing, if none."""
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return False
        needed = self._blocks_needed(request, num_new_tokens, computed_blocks)
        if computed_blocks:
            self.pool.touch(list(computed_blocks))
            request.block_ids.extend(computed_blocks)
            request.num_registered_blocks = len(request.block_ids)
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    def cache_full_blocks(self, request) -> None:
        """Register the request's blocks whose tokens are all computed, for later prefix hits."""
        if not self.enable_caching:
            return
        self._update_hashes(request)
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        for i in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def free(self, request) -> None:
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_registered_blocks = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
