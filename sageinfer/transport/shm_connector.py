"""Same-host KV transfer through shared host memory: the prefill instance writes a finished prompt's
KV into a file under /dev/shm (tmpfs: memory, not disk); the decode instance reads it straight into
the blocks it allocated for the prompt, and removes it.

Both copies run in background threads, off the engine's loop: the producer holds the request's
blocks until the file is complete (written under a temporary name, then renamed), the consumer
waits for the file to appear (up to load_timeout_s) and writes only blocks that nothing else uses
yet. The file is token-major (per cache tensor: [tokens, kv heads, head size]), so the two
instances' block sizes may differ. Files never read (a decode instance that never came) are removed
by their producer after staged_ttl_s.
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

from sageinfer.transport.remote_kv import RemoteKVConnector, kv_tensors

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
        self.workers = ThreadPoolExecutor(max_workers=int(self.extra.get("threads", 4)), thread_name_prefix="kv-shm")
        self.sending: dict[str, Future] = {}  # request -> its file being written (its blocks held)
        self.loads: dict[str, tuple[Future, str]] = {}  # request -> (its blocks being filled, file)

    def _device_ids(self, block_ids: list[int]) -> torch.Tensor:
        return self.platform.to_device(np.asarray(block_ids, dtype=np.int64), self.tensors[0].device)

    # ---- producer ----
    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        nb = num_tokens // self.block_size
        tokens = nb * self.block_size
        path = os.path.join(self.dir, f"{self.engine_id}-{uuid.uuid4().hex}.kv")
        params = self.base_params(request_id, tokens)
        params["path"] = path
        if not tokens:
            return False, params
        needed = tokens * sum(self.token_bytes)
        free = shutil.disk_usage(self.dir).free
        if free < needed:  # writing past a full tmpfs would kill the process (SIGBUS), not raise
            raise ValueError(f"{self.dir} has {free / 2**30:.2f} GiB free, {needed / 2**30:.2f} GiB needed to "
                             f"stage this prompt's KV (give the container more /dev/shm, or set shm_dir)")
        self.sending[request_id] = self.workers.submit(self._stage, list(block_ids[:nb]), tokens, path)
        return True, params

    def _stage(self, block_ids: list[int], tokens: int, path: str) -> None:
        part = path + ".part"
        try:
            buf = torch.from_file(part, shared=True, size=tokens * sum(self.token_bytes), dtype=torch.uint8)
            ids, offset = self._device_ids(block_ids), 0
            for t, per_token in zip(self.tensors, self.token_bytes):
                size = tokens * per_token
                dst = buf[offset:offset + size].view(t.dtype).view(tokens, *t.shape[2:])
                dst.copy_(t.index_select(0, ids).reshape(tokens, *t.shape[2:]))
                offset += size
            del buf
            os.rename(part, path)  # complete: a consumer waiting for it may read it now
        except BaseException:
            _remove(part)
            open(path + ".failed", "wb").close()  # a consumer waiting for it gives up at once
            raise

    def poll_sent(self) -> list[str]:
        done = []
        for request_id, future in list(self.sending.items()):
            if future.done():
                del self.sending[request_id]
                if future.exception() is not None:
                    logger.error("request %s: staging its KV failed: %s", request_id, future.exception())
                done.append(request_id)  # the blocks may go: their KV is in the file (or never will be)
        self._remove_expired(time.monotonic())
        return done

    def _remove_expired(self, now: float) -> None:
        """Files of this producer older than staged_ttl_s were never read: remove them (on a timer of
        their own age, so files left by an earlier run of this engine id go too)."""
        if not hasattr(self, "_next_sweep") or now >= self._next_sweep:
            self._next_sweep = now + min(self.ttl, 10.0)
            cutoff = time.time() - self.ttl
            for name in os.listdir(self.dir):
                full = os.path.join(self.dir, name)
                try:
                    if name.startswith(self.engine_id) and os.path.getmtime(full) < cutoff:
                        logger.warning("KV staged in %s was not read within %.0f s: removed", full, self.ttl)
                        _remove(full)
                except FileNotFoundError:
                    pass

    # ---- consumer ----
    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        reason = self.offer_mismatch(params, first_token, len(block_ids) * self.block_size)
        path = params.get("path")
        if reason is None and (not isinstance(path, str) or os.path.dirname(path) != self.dir):
            reason = f"the staged KV is not under this host's {self.dir}"
        if reason is not None:
            if isinstance(path, str) and os.path.dirname(path) == self.dir:
                _remove(path)
            raise ValueError(reason)
        future = self.workers.submit(self._load, path, int(params["remote_num_tokens"]), first_token, block_ids)
        self.loads[request_id] = (future, path)

    def _load(self, path: str, total: int, first: int, block_ids: list[int]) -> None:
        """Tokens [first, first + len(block_ids) * block_size) of every tensor into the blocks."""
        deadline = time.monotonic() + self.load_timeout
        while not os.path.exists(path):  # the producer may still be writing it
            if os.path.exists(path + ".failed"):
                _remove(path + ".failed")
                raise ValueError("the prefill instance could not stage this prompt's KV")
            if time.monotonic() > deadline:
                raise ValueError(f"the staged KV did not appear within {self.load_timeout:.0f} s")
            time.sleep(0.001)
        try:
            size = os.path.getsize(path)
            if size != total * sum(self.token_bytes):
                raise ValueError(f"the staged KV file has {size} bytes, {total * sum(self.token_bytes)} expected")
            mapped = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
            count = len(block_ids) * self.block_size
            ids, offset = self._device_ids(block_ids), 0
            for t, per_token in zip(self.tensors, self.token_bytes):
                part = mapped[offset + first * per_token:offset + (first + count) * per_token].view(t.dtype)
                t.index_copy_(0, ids, part.to(t.device).view(len(block_ids), self.block_size, *t.shape[2:]))
                offset += total * per_token
            self.platform.synchronize()  # filled before the engine is told (and schedules a step on them)
        finally:
            _remove(path)

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        return self.take_finished(self.loads)

    def cancel_load(self, request_id: str) -> bool:
        future, path = self.loads.get(request_id, (None, None))
        if future is None:
            return True
        if future.cancel():  # not started: nothing writes the blocks
            del self.loads[request_id]
            _remove(path)
            return True
        return False  # being written: the blocks are freed when poll_loaded reports it

    def close(self) -> None:
        self.workers.shutdown(wait=True, cancel_futures=True)
        for name in os.listdir(self.dir):
            if name.startswith(self.engine_id):
                _remove(os.path.join(self.dir, name))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
