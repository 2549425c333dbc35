"""Which healthy instance takes a request."""
from __future__ import annotations

import asyncio
import hashlib
import itertools

from sageinfer.router.backends import Backend
from sageinfer.router.prefix_index import PrefixIndex, chunk_hashes, prompt_key

POLICIES = ("round_robin", "least_load", "session", "prefix")
# prefix: the instance that holds the longest cached prefix, unless it has this many more requests
# than the least busy one (then the least busy: a hot prefix must not pile everything on one instance).
PREFIX_BALANCE_SLACK = 4


class Policy:
    def __init__(self, name: str, kv_events: bool = False, tokenizer: str | None = None):
        """kv_events (implied by tokenizer): the prefix policy measures prompts against the blocks
        the instances report holding (their KV events) rather than against the router's own record
        of where it sent which text; tokenizer: the instances' tokenizer directory, for text prompts
        and chats (token-id prompts need none)."""
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
        self.name = name
        self._turn = itertools.count()
        self.index = PrefixIndex()
        self.kv_index = None
        self.tokenizer = None
        if name == "prefix" and (kv_events or tokenizer):
            from sageinfer.router.kv_index import KVEventIndex, RouterTokenizer
            self.kv_index = KVEventIndex()
            self.tokenizer = RouterTokenizer(tokenizer)
        # on_decision(reason, expected hit tokens, prompt tokens): the router's metrics
        self.on_decision = lambda reason, hit, total: None

    async def token_ids(self, body: dict) -> list[int] | None:
        """The request's token ids where the prefix policy will measure them against the instances'
        KV events, tokenized on a worker thread (a fast tokenizer releases the GIL): a long prompt does
        not hold up the event loop that proxies every other stream. None where not needed."""
        if self.kv_index is None or not self.kv_index.instances:
            return None
        return await asyncio.to_thread(self.tokenizer.token_ids, body)

    def pick(self, healthy: list[Backend], session: str | None, body: dict | None = None,
             token_ids: list[int] | None = None) -> Backend:
        """token_ids: the request's, from token_ids(body), if already known."""
        if self.name == "prefix":
            return self._by_prefix(healthy, body or {}, token_ids)
        if self.name == "least_load":
            self.on_decision("least_load", 0, 0)
            return self._least_load(healthy)
        if self.name == "session" and session is not None:
            # Rendezvous hashing: a session stays on its instance while that one is up, and only the
            # sessions of an instance that leaves move.
            self.on_decision("session", 0, 0)
            return max(healthy, key=lambda b: hashlib.sha256(f"{session}\0{b.url}".encode()).digest())
        self.on_decision(self.name if self.name != "session" else "round_robin", 0, 0)
        return healthy[next(self._turn) % len(healthy)]

    def _least_load(self, healthy: list[Backend]) -> Backend:
        # Ties go round: equal instances share the work instead of the first taking it all.
        turn = next(self._turn)
        return min(healthy, key=lambda b: (b.load, (healthy.index(b) - turn) % len(healthy)))

    def _by_prefix(self, healthy: list[Backend], body: dict, token_ids: list[int] | None) -> Backend:
        if self.kv_index is not None and any(self.kv_index.has_events(b.url) for b in healthy):
            ids = token_ids if token_ids is not None else self.tokenizer.token_ids(body)
            if ids:
                return self._by_reported_blocks(healthy, ids)
        key = prompt_key(body)
        hashes = chunk_hashes(key) if key else []
        by_url = {b.url: b for b in healthy}
        owner, _ = self.index.match(hashes, set(by_url))
        least = self._least_load(healthy)
        chosen = by_url[owner] if owner and by_url[owner].load <= least.load + PREFIX_BALANCE_SLACK else least
        self.index.record(hashes, chosen.url)
        self.on_decision("prefix" if chosen.url == owner else "least_load", 0, 0)
        return chosen

    def _by_reported_blocks(self, healthy: list[Backend], ids: list[int]) -> Backend:
        """The instance whose cache holds the longest leading part of the prompt (by its own KV
        events), unless it is far busier than the least busy one."""
        held = self.kv_index.match(ids, [b.url for b in healthy])
        least = self._least_load(healthy)
        best = max(healthy, key=lambda b: (held.get(b.url, 0), -b.load))
        hit = held.get(best.url, 0)
        if hit and best.load <= least.load + PREFIX_BALANCE_SLACK:
            self.on_decision("prefix", hit, len(ids))
            return best
        self.on_decision("least_load", held.get(least.url, 0), len(ids))
        return least
