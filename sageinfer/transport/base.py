"""KV connector: moves whole KV blocks, keyed by their prefix hash, between the device cache and
somewhere else (a host memory tier now; another instance for prefill/decode separation later)."""
from __future__ import annotations


class KVConnector:
    def contains_prefix(self, keys: list[int]) -> int:
        """How many of keys, from the first, the connector holds."""
        raise NotImplementedError

    def save(self, keys: list[int], block_ids: list[int], protected: set[int], after_launched: bool = False) -> None:
        """Store device blocks under their keys (copies enqueued in stream order before later writes
        to those blocks). Entries whose keys are in protected must not be dropped to make room.
        after_launched: some block may still be written by work already enqueued, so the copies must
        follow it."""
        raise NotImplementedError

    def load(self, keys: list[int], block_ids: list[int]) -> None:
        """Fill device blocks from stored keys (enqueued before the step that reads them)."""
        raise NotImplementedError
