"""Which instance most likely holds a prompt's prefix in its KV cache, as the router saw it: prompts
are cut into chunks whose hashes chain over the ones before (as the instances' prefix-cache keys do),
and each chunk hash remembers the instance that last served it. An approximation of the instances'
own caches (they may have evicted since), bounded in size, least recently used out first.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

CHUNK_CHARS = 64   # text prompts
CHUNK_TOKENS = 16  # token-id prompts


def prompt_key(body: dict) -> str | list[int] | None:
    """The part of a request that becomes the KV cache's prefix: the prompt, or the conversation."""
    if "messages" in body:
        return json.dumps(body["messages"], ensure_ascii=False, sort_keys=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # several prompts: the first stands for the batch
    return prompt if isinstance(prompt, (str, list)) else None


def chunk_hashes(key: str | list[int]) -> list[bytes]:
    size = CHUNK_CHARS if isinstance(key, str) else CHUNK_TOKENS
    hashes, parent = [], b""
    for start in range(0, len(key) - size + 1, size):  # whole chunks only, as cache blocks are whole
        piece = key[start:start + size]
        data = piece.encode() if isinstance(piece, str) else json.dumps(piece).encode()
        parent = hashlib.sha256(parent + data).digest()
        hashes.append(parent)
    return hashes


class PrefixIndex:
    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def match(self, hashes: list[bytes], usable: set[str]) -> tuple[str | None, int]:
        """(instance holding the longest run of leading chunks, its length in chunks)."""
        best, length = None, 0
        for i, h in enumerate(hashes):
            owner = self._owner.get(h)
            if owner is None or owner not in usable:
                break
            best, length = owner, i + 1
        return best, length

    def record(self, hashes: list[bytes], url: str) -> None:
        for h in hashes:
            self._owner[h] = url
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
