"""KV cache events: an instance publishes which prefix blocks its cache gains and drops, so that a
router can send each request where its prefix is cached (vLLM's --kv-events-config and event shapes).

Wire: a ZMQ PUB socket sends multipart messages [topic, sequence number (8 bytes, big-endian),
msgpack KVEventBatch]. A ROUTER socket beside it (the replay endpoint) answers b"snapshot" with
[sequence number, KVEventBatch of every block held now], so that a subscriber that joins late, misses
a message (a gap in the numbers) or sees the instance restart (the numbers go back) starts over from
the snapshot. Block hashes are the prefix cache's own keys (kv_cache.manager.hash_block: SHA-256
chained over the block's tokens), which a subscriber recomputes from a prompt's tokens.

The events carry the cached prompts' token ids: bind the endpoints to a private network only.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import msgspec

from sageinfer.transport.json_options import json_object_option

logger = logging.getLogger(__name__)


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    medium: str = "GPU"


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[bytes]
    medium: str = "GPU"


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct):
    ts: float
    events: list[KVEvent]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)


def events_from_changes(changes: list[tuple], block_size: int) -> list[KVEvent]:
    """The prefix index's changes (kv_cache.manager.take_events) as events; a run of stored blocks
    that chain one to the next becomes one BlockStored."""
    events: list[KVEvent] = []
    for change in changes:
        kind, last = change[0], events[-1] if events else None
        if kind == "stored":
            _, block_hash, parent, tokens = change
            if isinstance(last, BlockStored) and last.medium == "GPU" and last.block_hashes[-1] == parent:
                last.block_hashes.append(block_hash)
                last.token_ids.extend(tokens)
            else:
                events.append(BlockStored([block_hash], parent, list(tokens), block_size))
        elif kind == "stored_host":  # a device block's copy in host memory (the offload tier knows no tokens)
            if isinstance(last, BlockStored) and last.medium == "CPU":
                last.block_hashes.append(change[1])
            else:
                events.append(BlockStored([change[1]], None, [], block_size, medium="CPU"))
        elif kind in ("removed", "removed_host"):
            medium = "GPU" if kind == "removed" else "CPU"
            if isinstance(last, BlockRemoved) and last.medium == medium:
                last.block_hashes.append(change[1])
            else:
                events.append(BlockRemoved([change[1]], medium=medium))
        else:
            events.append(AllBlocksCleared())
    return events


def parse_kv_events_config(value) -> dict | None:
    """--kv-events-config (JSON text or a dict, vLLM's fields) validated, defaults filled in; None when
    events are off."""
    known = {"enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint", "topic", "buffer_steps", "hwm",
             "max_queue_size"}
    value = json_object_option(value, "kv_events_config", known)
    if value is None:
        return None
    if not value.get("enable_kv_cache_events", False) or value.get("publisher", "zmq") == "null":
        return None
    if value.get("publisher", "zmq") != "zmq":
        raise ValueError(f"kv_events_config: publisher must be 'zmq' or 'null', got {value.get('publisher')!r}")
    endpoint = value.get("endpoint", "tcp://*:5557")
    replay = value.get("replay_endpoint")
    for name, address in (("endpoint", endpoint), ("replay_endpoint", replay)):
        if address is not None and (not isinstance(address, str) or "://" not in address):
            raise ValueError(f"kv_events_config: {name} must be a ZMQ address such as tcp://*:5557, got {address!r}")
    if replay is None:  # the port after the events' own
        if not endpoint.startswith("tcp://"):
            raise ValueError("kv_events_config: give replay_endpoint for a non-TCP endpoint")
        host, _, port = endpoint.rpartition(":")
        replay = f"{host}:{int(port) + 1}"
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "replay_endpoint": replay,
            "topic": str(value.get("topic", "")), "hwm": int(value.get("hwm", 100_000))}


class KVEventPublisher:
    """Publishes the engine's KV events from a thread of its own (the ZMQ sockets live there), and
    keeps a copy of the blocks held now for the snapshots it answers."""

    def __init__(self, config: dict, block_size: int):
        import zmq
        self.config = config
        self.block_size = block_size
        self.topic = config["topic"].encode()
        self.pending: queue.Queue = queue.Queue()
        self.held: dict[tuple[str, bytes], BlockStored] = {}  # (medium, hash) -> the one-block event that stored it
        self.seq = 0
        self.closed = threading.Event()
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, config["hwm"])
        self.pub.setsockopt(zmq.LINGER, 0)
        self.replay = self.context.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.LINGER, 0)
        try:
            self.pub.bind(config["endpoint"])
            self.replay.bind(config["replay_endpoint"])
        except zmq.ZMQError as exc:
            self.context.destroy(linger=0)
            raise ValueError(f"kv_events_config: cannot bind {config['endpoint']} / {config['replay_endpoint']}: "
                             f"{exc}") from None
        self.thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self.thread.start()

    def publish(self, changes: list[tuple]) -> None:
        """Called by the engine loop after a step with the prefix index's changes
        (kv_cache.manager.take_events): hands them over without waiting."""
        if changes:
            self.pending.put(changes)

    def _run(self) -> None:
        import zmq
        poller = zmq.Poller()
        poller.register(self.replay, zmq.POLLIN)
        while not self.closed.is_set():
            if poller.poll(5):
                self._answer_snapshot()
            while True:
                try:
                    changes = self.pending.get_nowait()
                except queue.Empty:
                    break
                self._send(events_from_changes(changes, self.block_size))
        self.context.destroy(linger=0)

    def _send(self, events: list[KVEvent]) -> None:
        for event in events:  # the copy the snapshots are made of
            if isinstance(event, BlockStored):
                bs, parent = event.block_size, event.parent_block_hash
                for i, h in enumerate(event.block_hashes):
                    self.held[event.medium, h] = BlockStored([h], parent, event.token_ids[i * bs:(i + 1) * bs], bs,
                                                             event.medium)
                    parent = h
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self.held.pop((event.medium, h), None)
            else:  # a subscriber forgets every medium (a host copy left is merely not routed to)
                self.held.clear()
        self.seq += 1
        self.pub.send_multipart([self.topic, self.seq.to_bytes(8, "big"),
                                 encode_batch(KVEventBatch(time.time(), list(events)))])

    def _answer_snapshot(self) -> None:
        identity, *frames = self.replay.recv_multipart()
        if frames[-1:] != [b"snapshot"]:
            return self.replay.send_multipart([identity, b"", b"", b"unknown request; send b'snapshot'"])
        batch = KVEventBatch(time.time(), [AllBlocksCleared(), *self.held.values()])
        self.replay.send_multipart([identity, b"", self.seq.to_bytes(8, "big"), encode_batch(batch)])

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=2)
