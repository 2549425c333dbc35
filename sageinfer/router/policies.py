"""Which healthy instance takes a request."""
from __future__ import annotations

import hashlib
import itertools

from sageinfer.router.backends import Backend
from sageinfer.router.prefix_index import PrefixIndex, chunk_hashes, prompt_key

POLICIES = ("round_robin", "least_load", "session", "prefix")
# prefix: the instance that holds the longest cached prefix, unless it has this many more requests
# than the least busy one (then the least busy: a hot prefix must not pile everything on one instance).
PREFIX_BALANCE_SLACK = 4


class Policy:
    def __init__(self, name: str):
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
        self.name = name
        self._turn = itertools.count()
        self.index = PrefixIndex()

    def pick(self, healthy: list[Backend], session: str | None, body: dict | None = None) -> Backend:
        if self.name == "prefix":
            return self._by_prefix(healthy, body or {})
        if self.name == "least_load":
            return self._least_load(healthy)
        if self.name == "session" and session is not None:
            # Rendezvous hashing: a session stays on its instance while that one is up, and only the
            # sessions of an instance that leaves move.
            return max(healthy, key=lambda b: hashlib.sha256(f"{session}\0{b.url}".encode()).digest())
        return healthy[next(self._turn) % len(healthy)]

    def _least_load(self, healthy: list[Backend]) -> Backend:
        # Ties go round: equal instances share the work instead of the first taking it all.
        turn = next(self._turn)
        return min(healthy, key=lambda b: (b.load, (healthy.index(b) - turn) % len(healthy)))

    def _by_prefix(self, healthy: list[Backend], body: dict) -> Backend:
        key = prompt_key(body)
        hashes = chunk_hashes(key) if key else []
        by_url = {b.url: b for b in healthy}
        owner, _ = self.index.match(hashes, set(by_url))
        least = self._least_load(healthy)
        chosen = by_url[owner] if owner and by_url[owner].load <= least.load + PREFIX_BALANCE_SLACK else least
        self.index.record(hashes, chosen.url)
        return chosen
