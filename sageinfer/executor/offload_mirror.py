"""The offload tier at tensor parallel size > 1: each rank keeps its own shard of every offloaded
block in its own host memory. Rank 0's cache manager decides what moves (its HostOffloadConnector
picks the host slots); the other ranks replay the same saves and loads, shipped in the next step
message and applied before that step, on a connector of the same size over their own cache. The
slot choices are a function of the calls alone, so every rank's host slots hold the same blocks.
"""
from __future__ import annotations

import msgspec

from sageinfer.transport.base import KVConnector


class OffloadOp(msgspec.Struct, array_like=True):
    load: bool                # False: save
    keys: list[bytes]
    block_ids: list[int]
    protected: list[bytes]
    after_launched: bool
    num_host_blocks: int      # the tier's size (a worker builds its connector at the first op)


class MirroredOffload(KVConnector):
    """Rank 0's tier: applies each save and load here and records it for the other ranks."""

    def __init__(self, local):
        self.local = local
        self.pending: list[OffloadOp] = []

    def contains_prefix(self, keys: list[int]) -> int:
        return self.local.contains_prefix(keys)

    def save(self, keys, block_ids, protected, after_launched: bool = False) -> None:
        self.local.save(keys, block_ids, protected, after_launched)
        self.pending.append(OffloadOp(False, list(keys), list(block_ids), sorted(protected), after_launched,
                                      self.local.num_host_blocks))

    def load(self, keys, block_ids) -> None:
        self.local.load(keys, block_ids)
        self.pending.append(OffloadOp(True, list(keys), list(block_ids), [], False, self.local.num_host_blocks))

    def take_ops(self) -> list[OffloadOp]:
        ops, self.pending = self.pending, []
        return ops

    # what the cache manager and the metrics read or set on the tier
    @property
    def events(self):
        return self.local.events

    @events.setter
    def events(self, value) -> None:
        self.local.events = value

    def __getattr__(self, name):
        return getattr(self.local, name)


def replay(connector, ops: list[OffloadOp], kv_caches: list, platform):
    """A worker's side: apply rank 0's saves and loads to this rank's tier (built at the first op);
    returns the tier."""
    for op in ops:
        if connector is None:
            from sageinfer.transport.host_offload import HostOffloadConnector
            connector = HostOffloadConnector(kv_caches, op.num_host_blocks, platform)
        if op.load:
            connector.load(op.keys, op.block_ids)
        else:
            connector.save(op.keys, op.block_ids, set(op.protected), op.after_launched)
    return connector
