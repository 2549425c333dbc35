"""Which healthy instance takes a request."""
from __future__ import annotations

import hashlib
import itertools

from sageinfer.router.backends import Backend

POLICIES = ("round_robin", "least_load", "session")


class Policy:
    def __init__(self, name: str):
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
        self.name = name
        self._turn = itertools.count()

    def pick(self, healthy: list[Backend], session: str | None) -> Backend:
        if self.name == "least_load":
            # Ties go round: equal instances share the work instead of the first taking it all.
            turn = next(self._turn)
            return min(healthy, key=lambda b: (b.load, (healthy.index(b) - turn) % len(healthy)))
        if self.name == "session" and session is not None:
            # Rendezvous hashing: a session stays on its instance while that one is up, and only the
            # sessions of an instance that leaves move.
            return max(healthy, key=lambda b: hashlib.sha256(f"{session}\0{b.url}".encode()).digest())
        return healthy[next(self._turn) % len(healthy)]
