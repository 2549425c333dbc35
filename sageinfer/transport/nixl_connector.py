"""KV transfer through NIXL (NVIDIA's inference transfer library; its UCX backend moves memory over
RDMA where the machine has it, and over TCP or shared memory where it does not).

The prefill instance registers its whole paged cache with a NIXL agent and, when a request
finishes, holds its blocks and hands out what the decode instance needs to read them: the agent's
metadata, the cache's addresses and the block ids. The decode instance reads those blocks straight
into its own (one NIXL READ per request); the read's completion notifies the producer, which frees
the blocks. A producer never notified (a decode instance that failed or never came) frees them after
abort_timeout_s. Both sides must use the same block size and cache layout (checked per request: a
mismatch makes the decode instance compute the prompt itself).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import time

import numpy as np

from sageinfer.transport.remote_kv import RemoteKVConnector, kv_tensors

logger = logging.getLogger(__name__)


def _nixl_api():
    """NIXL's agent classes: from the nixl package, or straight from the build for this CUDA major
    (nixl-cu12 / nixl-cu13; the nixl package itself pulls in both)."""
    for module in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            api = __import__(module, fromlist=["nixl_agent"])
            return api.nixl_agent, api.nixl_agent_config
        except ImportError as exc:
            error = exc
    raise error


class NixlConnector(RemoteKVConnector):
    name = "NixlConnector"

    def __init__(self, config: dict, kv_caches: list, block_size: int, platform):
        super().__init__(config, kv_caches, block_size, platform)
        try:
            nixl_agent, nixl_agent_config = _nixl_api()
        except ImportError as exc:
            raise ValueError(f"kv_connector NixlConnector needs NIXL (pip install 'sageinfer[nixl]'): {exc}") from None
        backends = self.extra.get("backends") or ["UCX"]
        self.agent = nixl_agent(f"{self.engine_id}-{id(self):x}", nixl_agent_config(backends=list(backends)))
        self.tensors = kv_tensors(kv_caches)
        self.mem_type = platform.kv_transfer_memory_type()
        self.device_id = self.tensors[0].device.index or 0
        self.registered = self.agent.register_memory(self.tensors)
        self.block_bytes = [t[0].numel() * t.element_size() for t in self.tensors]
        self.bases = [t.data_ptr() for t in self.tensors]
        self.metadata = base64.b64encode(self.agent.get_agent_metadata()).decode()
        self.held: dict[str, float] = {}  # request -> when its blocks are freed unread
        self.peers: dict[str, str] = {}   # digest of a producer's metadata -> its agent name here
        self.loads: dict[str, tuple] = {}  # request -> (transfer handle, peer, remote request id, deadline)

    # ---- producer ----
    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        nb = num_tokens // self.block_size
        params = self.base_params(request_id, nb * self.block_size)
        params.update(remote_agent_metadata=self.metadata, remote_block_ids=list(block_ids[:nb]),
                      remote_bases=self.bases, remote_block_bytes=self.block_bytes,
                      remote_device_id=self.device_id)
        if not nb:
            return False, params
        self.held[request_id] = time.monotonic() + self.abort_timeout
        self.sends_via["nixl"] += 1
        return True, params

    def poll_sent(self) -> list[str]:
        done = []
        for messages in self.agent.get_new_notifs().values():
            for message in messages:
                request_id = message.decode(errors="replace")
                if self.held.pop(request_id, None) is not None:
                    done.append(request_id)
        return done + self.expire(self.held, lambda deadline: deadline, self.abort_timeout)

    # ---- consumer ----
    def _peer(self, metadata: str) -> str:
        key = hashlib.sha256(metadata.encode()).hexdigest()
        if key not in self.peers:
            self.peers[key] = self.agent.add_remote_agent(base64.b64decode(metadata))
        return self.peers[key]

    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        reason = self.offer_mismatch(params, first_token, len(block_ids) * self.block_size)
        if reason is None and params.get("remote_block_size") != self.block_size:
            reason = (f"NixlConnector moves whole blocks: the prefill instance's block size "
                      f"{params.get('remote_block_size')} differs from this instance's {self.block_size}")
        remote_blocks = list(params.get("remote_block_ids") or [])
        first_block = first_token // self.block_size
        if reason is None and first_block + len(block_ids) > len(remote_blocks):
            reason = "the prefill instance offers fewer blocks than asked for"
        if reason is None and len(params.get("remote_bases") or []) != len(self.tensors):
            reason = "kv_transfer_params carry no cache addresses for every tensor"
        if reason is not None:
            raise ValueError(reason)
        peer = self._peer(params["remote_agent_metadata"])
        remote_ids = np.asarray(remote_blocks[first_block:first_block + len(block_ids)], dtype=np.int64)
        local_ids = np.asarray(block_ids, dtype=np.int64)
        local, remote = [], []
        for base, rbase, size in zip(self.bases, params["remote_bases"], self.block_bytes):
            local.append(np.stack([base + local_ids * size, np.full_like(local_ids, size),
                                   np.full_like(local_ids, self.device_id)], 1))
            remote.append(np.stack([rbase + remote_ids * size, np.full_like(remote_ids, size),
                                    np.full_like(remote_ids, int(params.get("remote_device_id", 0)))], 1))
        local_descs = self.agent.get_xfer_descs(np.concatenate(local), self.mem_type)
        remote_descs = self.agent.get_xfer_descs(np.concatenate(remote), self.mem_type)
        remote_request = str(params.get("remote_request_id", ""))
        handle = self.agent.initialize_xfer("READ", local_descs, remote_descs, peer, remote_request.encode())
        if self.agent.transfer(handle) == "ERR":
            self.agent.release_xfer_handle(handle)
            raise ValueError("NIXL could not start reading the prefill instance's KV")
        self.loads[request_id] = (handle, peer, remote_request, time.monotonic() + self.load_timeout)

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        done = []
        now = time.monotonic()
        for request_id, (handle, peer, remote_request, deadline) in list(self.loads.items()):
            state = self.agent.check_xfer_state(handle)
            if state == "PROC" and now < deadline:
                continue
            del self.loads[request_id]
            self.agent.release_xfer_handle(handle)
            if state == "DONE":
                done.append((request_id, None))
                continue
            try:  # the producer may be gone; if not, it frees the blocks now rather than at its timeout
                self.agent.send_notif(peer, remote_request.encode())
            except Exception:  # noqa: BLE001
                pass
            done.append((request_id, "the NIXL read failed" if state == "ERR" else
                         f"the NIXL read did not end within {self.load_timeout:.0f} s"))
        return done

    def cancel_load(self, request_id: str) -> bool:
        return request_id not in self.loads  # a read in flight still writes the blocks: freed when it ends

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self.registered)
        except Exception:  # noqa: BLE001
            pass
