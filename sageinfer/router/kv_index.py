"""What each instance's prefix cache holds, from the KV events it publishes (transport/kv_events.py):
the router subscribes to every instance that names its event endpoints at GET /kv_events, keeps the
set of block hashes each one holds, and measures a request's prefix against them in its own tokens.

The request is tokenized here as the instance does (its tokenizer, its chat template), and its blocks
hashed with the instance's key (kv_cache.manager.hash_block). A request rendered differently here
than there (a template fed other fields) matches a shorter prefix, never a wrong one.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
from dataclasses import dataclass, field
from urllib.parse import urlparse

from sageinfer.kv_cache.manager import hash_blocks
from sageinfer.transport.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, decode_batch

logger = logging.getLogger(__name__)


@dataclass
class InstanceBlocks:
    """One instance's cached blocks by medium (GPU: its device cache, CPU: its host offload tier), as
    its events and snapshots say. A block held on either is a prefix hit there."""
    media: dict[str, set[bytes]] = field(default_factory=dict)
    block_size: int | None = None
    synced: bool = False  # a snapshot has been applied and no message missed since

    def apply(self, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                self.media.setdefault(event.medium, set()).update(event.block_hashes)
                self.block_size = event.block_size
            elif isinstance(event, BlockRemoved):
                self.media.get(event.medium, set()).difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.media.clear()

    def holds(self, block_hash: bytes) -> bool:
        return any(block_hash in held for held in self.media.values())

    def blocks(self, medium: str = "GPU") -> set[bytes]:
        return self.media.get(medium, set())


def prompt_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """The prefix-cache keys of a prompt's blocks that a hit can cover (never the last token's)."""
    return hash_blocks(None, token_ids[:len(token_ids) - 1], block_size)


class KVEventIndex:
    def __init__(self):
        self.instances: dict[str, InstanceBlocks] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._followed: dict[str, tuple] = {}  # url -> the endpoints and topic its subscription uses

    def match(self, token_ids: list[int], urls: list[str]) -> dict[str, int]:
        """Tokens of the prompt's leading blocks that each synced instance holds (instances without
        events are left out)."""
        by_size: dict[int, list[bytes]] = {}
        out = {}
        for url in urls:
            state = self.instances.get(url)
            if state is None or not state.synced or not state.block_size:
                continue
            hashes = by_size.setdefault(state.block_size, prompt_hashes(token_ids, state.block_size))
            n = 0
            while n < len(hashes) and state.holds(hashes[n]):
                n += 1
            out[url] = n * state.block_size
        return out

    def is_following(self, url: str) -> bool:
        task = self._tasks.get(url)
        return task is not None and not task.done()

    def has_events(self, url: str) -> bool:
        state = self.instances.get(url)
        return state is not None and state.synced

    # ---- subscriptions ---------------------------------------------------------------------------
    def follow(self, url: str, info: dict) -> None:
        """Subscribe to an instance's events (info: its GET /kv_events answer), once; again from the
        start (a new snapshot) where the answer names other endpoints than the subscription's: an
        instance started again may publish on other ports."""
        host = urlparse(url).hostname or "127.0.0.1"
        endpoints = [_reachable(info[k], host) for k in ("endpoint", "replay_endpoint")]
        topic = str(info.get("topic", "")).encode()
        if self.is_following(url):
            if self._followed.get(url) == (*endpoints, topic):
                return
            self.forget(url)
        self.instances[url] = InstanceBlocks(block_size=info.get("block_size"))
        self._followed[url] = (*endpoints, topic)
        self._tasks[url] = asyncio.get_running_loop().create_task(self._subscribe(url, *endpoints, topic))

    def forget(self, url: str) -> None:
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
        self.instances.pop(url, None)
        self._followed.pop(url, None)

    def mark_stale(self, url: str) -> None:
        """The instance stopped answering: what it held no longer counts (it resyncs when back)."""
        state = self.instances.get(url)
        if state is not None:
            state.synced = False
            state.media.clear()

    async def close(self) -> None:
        for url in list(self._tasks):
            self.forget(url)

    async def _subscribe(self, url: str, endpoint: str, replay: str, topic: bytes) -> None:
        import zmq
        import zmq.asyncio
        context = zmq.asyncio.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)
        state = self.instances[url]
        last = None
        try:
            while True:
                if not state.synced:
                    last = await self._snapshot(context, replay, state)
                    if last is None:
                        await asyncio.sleep(1.0)
                        continue
                try:
                    _, seq_bytes, payload = await asyncio.wait_for(sub.recv_multipart(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                seq = int.from_bytes(seq_bytes, "big")
                if seq <= last:
                    continue  # already in the snapshot
                if seq != last + 1:  # a message missed: start over from a snapshot
                    logger.info("KV events of %s: sequence %d after %d, resyncing", url, seq, last)
                    state.synced = False
                    continue
                state.apply(decode_batch(payload))
                last = seq
        except asyncio.CancelledError:
            pass
        finally:
            context.destroy(linger=0)

    @staticmethod
    async def _snapshot(context, replay: str, state: InstanceBlocks) -> int | None:
        """Every block the instance holds now; the sequence number it is current to (None: no answer)."""
        import zmq
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay)
        try:
            await dealer.send_multipart([b"", b"snapshot"])
            _, seq_bytes, payload = await asyncio.wait_for(dealer.recv_multipart(), timeout=2.0)
        except (asyncio.TimeoutError, ValueError):
            return None
        finally:
            dealer.close(linger=0)
        if not seq_bytes:
            return None
        state.media.clear()
        state.apply(decode_batch(payload))
        state.synced = True
        return int.from_bytes(seq_bytes, "big")


def _reachable(address: str, host: str) -> str:
    """tcp://*:5557 as bound by the instance, addressed through the host the router reaches it at."""
    scheme, _, rest = address.partition("://")
    bound_host, _, port = rest.rpartition(":")
    if bound_host in ("*", "0.0.0.0", "::", "[::]", ""):
        bound_host = host
    return f"{scheme}://{bound_host}:{port}"


class RouterTokenizer:
    """Tokenizes requests as the instances do: completions' prompts, and chats through the template.
    Without a tokenizer only prompts sent as token ids are measured."""

    def __init__(self, path: str | None):
        from sageinfer.engine.input_processor import load_tokenizer
        self.tokenizer = load_tokenizer(path) if path else None

    def token_ids(self, body: dict) -> list[int] | None:
        try:
            if "messages" in body:
                return self._chat(body) if self.tokenizer is not None else None
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # several prompts: the first stands for the batch
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt) if self.tokenizer is not None else None
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return prompt
        except Exception as exc:  # noqa: BLE001 - a request the router can't render is routed by load
            logger.debug("could not tokenize a request for routing: %s", exc)
        return None

    def _chat(self, body: dict) -> list[int] | None:
        messages = []
        for m in body["messages"]:
            m = copy.deepcopy(m)
            if isinstance(m.get("content"), list):  # content parts: their text, as the server reads them
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
            for call in m.get("tool_calls") or []:
                args = call.get("function", {}).get("arguments")
                if isinstance(args, str):
                    try:
                        call["function"]["arguments"] = json.loads(args)
                    except ValueError:
                        pass
            messages.append(m)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, tools=body.get("tools") or None,
                                                  add_generation_prompt=body.get("add_generation_prompt", True))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
