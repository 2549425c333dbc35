"""Same-host KV transfer through shared host memory: the prefill instance writes a finished prompt's
KV into a file under /dev/shm (tmpfs: memory, not disk) and frees its blocks at once; the decode
instance reads the file in a background thread, copies it into its own blocks and removes it.

The file is token-major (per cache tensor: [tokens, kv heads, head size]), so the two instances'
block sizes may differ: each side gathers or scatters its own blocks. Files never read (a decode
instance that never came) are removed by their producer after staged_ttl_s.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from sageinfer.transport.remote_kv import RemoteKVConnector, kv_tensors, layout_mismatch

logger = logging.getLogger(__name__)


def _default_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class SharedMemoryConnector(RemoteKVConnector):
    name = "SharedMemoryConnector"

    def __init__(self, config: dict, kv_caches: list, block_size: int, platform):
        super().__init__(config, kv_caches, block_size, platform)
        self.dir = os.path.join(self.extra.get("shm_dir") or _default_dir(), "sageinfer-kv")
        os.makedirs(self.dir, exist_ok=True)
        self.ttl = float(self.extra.get("staged_ttl_s", 300))
        self.tensors = kv_tensors(kv_caches)
        self.token_bytes = [t[0, 0].numel() * t.element_size() for t in self.tensors]
        self.staged: dict[str, float] = {}  # files written here and not yet known to be read -> when
        self.reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-shm-read")
        self.loads: dict[str, tuple[Future, list[int], str]] = {}  # request -> (host tensors, blocks, file)

    def _device_ids(self, block_ids: list[int]) -> torch.Tensor:
        return self.platform.to_device(np.asarray(block_ids, dtype=np.int64), self.tensors[0].device)

    # ---- producer ----
    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        nb = num_tokens // self.block_size
        tokens = nb * self.block_size
        path = os.path.join(self.dir, f"{self.engine_id}-{uuid.uuid4().hex}.kv")
        if tokens:
            needed = tokens * sum(self.token_bytes)
            free = shutil.disk_usage(self.dir).free
            if free < needed:  # writing past a full tmpfs would kill the process (SIGBUS), not raise
                raise ValueError(f"{self.dir} has {free / 2**30:.2f} GiB free, {needed / 2**30:.2f} GiB needed to "
                                 f"stage this prompt's KV (give the container more /dev/shm, or set shm_dir)")
            buf = torch.from_file(path, shared=True, size=needed, dtype=torch.uint8)
            ids, offset = self._device_ids(block_ids[:nb]), 0
            for t, per_token in zip(self.tensors, self.token_bytes):
                size = tokens * per_token
                dst = buf[offset:offset + size].view(t.dtype).view(tokens, *t.shape[2:])
                dst.copy_(t.index_select(0, ids).reshape(tokens, *t.shape[2:]))
                offset += size
            del buf  # the mapping; the file stays until the decode instance reads it
            self.staged[path] = time.monotonic()
        params = self.base_params(request_id, tokens)
        params["path"] = path
        return False, params  # the blocks are free to go: their KV is in the file

    def poll_sent(self) -> list[str]:
        now = time.monotonic()
        for path, when in list(self.staged.items()):
            if not os.path.exists(path):
                del self.staged[path]  # read and removed by its consumer
            elif now - when > self.ttl:
                logger.warning("KV staged in %s was not read within %.0f s: removed", path, self.ttl)
                _remove(path)
                del self.staged[path]
        return []

    # ---- consumer ----
    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        reason = layout_mismatch(self.layout, params.get("remote_layout"))
        path = params.get("path")
        if reason is None and (not isinstance(path, str) or not path.startswith(self.dir + os.sep)):
            reason = f"the staged KV is not under this host's {self.dir}"
        num_tokens = len(block_ids) * self.block_size
        if reason is None and first_token + num_tokens > int(params.get("remote_num_tokens", 0)):
            reason = "the staged KV holds fewer tokens than asked for"
        if reason is not None:
            if isinstance(path, str) and path.startswith(self.dir + os.sep):
                _remove(path)
            raise ValueError(reason)
        future = self.reader.submit(self._read, path, int(params["remote_num_tokens"]), first_token, num_tokens)
        self.loads[request_id] = (future, block_ids, path)

    def _read(self, path: str, total: int, first: int, count: int) -> list[torch.Tensor]:
        """The token range [first, first + count) of every tensor, in (pinned) host memory."""
        size = os.path.getsize(path)
        if size != total * sum(self.token_bytes):
            raise ValueError(f"the staged KV file has {size} bytes, {total * sum(self.token_bytes)} expected")
        mapped = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
        out, offset = [], 0
        for t, per_token in zip(self.tensors, self.token_bytes):
            part = mapped[offset + first * per_token:offset + (first + count) * per_token]
            host = self.platform.host_buffer((count, *t.shape[2:]), t.dtype)
            host.view(torch.uint8).view(-1).copy_(part)
            out.append(host)
            offset += total * per_token
        return out

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        done = []
        for request_id, (future, block_ids, path) in list(self.loads.items()):
            if not future.done():
                continue
            del self.loads[request_id]
            _remove(path)
            try:
                host = future.result()
            except Exception as exc:  # noqa: BLE001 - the reason goes back with the request
                done.append((request_id, f"{type(exc).__name__}: {exc}"))
                continue
            ids = self._device_ids(block_ids)
            for t, staged in zip(self.tensors, host):
                t.index_copy_(0, ids, staged.to(t.device).view(len(block_ids), self.block_size, *t.shape[2:]))
            done.append((request_id, None))
        return done

    def cancel_load(self, request_id: str) -> bool:
        entry = self.loads.pop(request_id, None)
        if entry is not None:
            entry[0].cancel()
            _remove(entry[2])
        return True  # the reader writes only its own host buffers: the blocks are free at once

    def close(self) -> None:
        self.reader.shutdown(wait=False, cancel_futures=True)
        for path in self.staged:
            _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
