"""Same-host KV transfer through shared host memory (where device memory cannot be shared: no IPC on
the platform, or instances in separate containers): the prefill instance copies a finished prompt's
KV into shared memory under /dev/shm (tmpfs: memory, not disk); the decode instance copies it from
there into the blocks it allocated for the prompt.

Where it goes:
  - a staging region (staging_gb, 8 by default, at most half the directory's free space): one file
    the prefill instance creates at start and page-locks, so that the copies into it run at DMA
    speed (pageable copies went at 0.98 GB/s on an H100); each prompt's KV takes a range of it. A
    decode instance maps the region once and page-locks it on its side. Markers beside it,
    `{engine}-{key}.ready|.failed|.claim|.done`, say when a range is complete, who holds it (the
    consumer's .claim before it reads; the producer's once the range has waited staged_ttl_s:
    whoever creates it first decides, so a range being read is never reused), and when it was read.
  - where the region has no room when a prompt's prefill ends, the prompt waits for room (its blocks
    held, up to load_timeout_s, behind earlier ones that wait) and is staged as ranges are read: its
    range's offset is then in the .ready marker, not in the kv_transfer_params. A decode instance
    starts a load only once its KV is staged (polled), so loads that wait never hold up those that
    could run, whose ranges, once read, make the room the waiting prompts need.
  - a file per prompt, where the region could never hold it (or staging_gb is 0): written under a
    temporary name, then renamed; the decode instance reads it and removes it.

A prompt's KV leaves while it computes: the model calls stage_step's hook after each layer of a step,
which copies that layer's KV of the blocks the step completes into the prompt's range of the region
on a copy stream, behind the layer's kernels and beside the next layers' (chunk after chunk, for a
prompt computed in several). What is left when the prefill ends (blocks of steps whose copies broke
off, or a prompt that went through a file) is copied then, in background threads on copy streams of
their own. The producer holds the request's blocks until its KV is staged, the consumer waits for
it (up to load_timeout_s) and writes only blocks that nothing else uses yet. Staged KV is token-major
(per cache tensor: [tokens, kv heads, head size]), so the two instances' block sizes may differ.
Staged KV never read (a decode instance that never came) is removed by its producer after
staged_ttl_s.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from sageinfer.transport.marker_files import (create_marker, default_dir, process_alive, release_unread, remove_file,
                                               write_marker)
from sageinfer.transport.remote_kv import RemoteKVConnector, kv_tensors

logger = logging.getLogger(__name__)
PAGE = 4096  # ranges of the region start on pages
_NAME = re.compile(r"[0-9A-Za-z_.-]{1,128}")
_KEY = re.compile(r"[0-9a-f]{32}")
_REGION = re.compile(r"region-(.+)-(\d+)\.kv")


def on_memory_filesystem(path: str) -> bool:
    """Whether path lies on a filesystem in memory (tmpfs, hugetlbfs). Only there can a shared file's
    pages be page-locked: Linux refuses long-term pins of pages that a disk filesystem writes back."""
    try:
        with open("/proc/self/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts]
    except OSError:
        return False
    path = os.path.realpath(path)
    best, kind = "", ""
    for mount_point, fs_type in entries:
        mount_point = mount_point.replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind in ("tmpfs", "hugetlbfs", "ramfs")


class ByteRanges:
    """First-fit allocation of page-aligned byte ranges in a region of size bytes."""

    def __init__(self, size: int):
        self.size = size
        self.free = [(0, size)]  # (offset, length): sorted, disjoint, never adjacent

    @staticmethod
    def round_to_pages(n: int) -> int:
        return -(-n // PAGE) * PAGE

    def take(self, n: int) -> int | None:
        """The offset of a free range of n bytes, now taken; None if none is large enough."""
        n = self.round_to_pages(n)
        for i, (offset, length) in enumerate(self.free):
            if length >= n:
                self.free[i:i + 1] = [(offset + n, length - n)] if length > n else []
                return offset
        return None

    def give(self, offset: int, n: int) -> None:
        bisect.insort(self.free, (offset, self.round_to_pages(n)))
        merged = []
        for o, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((o, length))
        self.free = merged

    @property
    def bytes_free(self) -> int:
        return sum(length for _, length in self.free)


@dataclass
class _EarlyStaging:
    """A prompt's range of the region, taken at its first chunk, and the copies of its blocks so far."""
    offset: int
    tokens: int  # the prompt's whole blocks: what send() will offer
    blocks: int = 0  # blocks whose copies were enqueued for every layer
    copies: list = field(default_factory=list)  # per step, an event after its copies on the copy stream

    def wait(self) -> None:
        """Until the copies enqueued so far have run."""
        for event in self.copies:
            if event is not None:
                event.synchronize()


class _LayerCopies:
    """Called by the model after each layer of a step (AttentionMetadata.after_layer): that layer's KV of
    the blocks the step completes goes to the prompts' ranges on the connector's copy stream, after an
    event that orders it behind the layer's kernels. A prompt's blocks count as staged once the last
    layer's copies are enqueued; a step cut short (an error), or one that a captured graph runs (which
    calls nothing), leaves them to the next chunk or to send()."""

    def __init__(self, connector: "SharedMemoryConnector", plans: list):
        self.connector, self.plans, self.failed = connector, plans, False
        self.ids = None  # the plans' block ids on the device, made on the copy stream (which alone reads them)

    def __call__(self, layer: int) -> None:
        c = self.connector
        if self.failed:
            return
        try:
            after_layer = c.platform.record_event()
            with c.platform.copy_stream_context(c.layer_stream()):
                if after_layer is not None:
                    c.platform.wait_event(after_layer)
                if self.ids is None:
                    self.ids = [c._device_ids(block_ids) for _, block_ids, _ in self.plans]
                for (early, _, done), ids in zip(self.plans, self.ids):
                    self._copy(layer, early, ids, done)
                if layer == len(c.layer_tensors) - 1:
                    copied = c.platform.record_event()
                    for early, _, done in self.plans:
                        early.copies.append(copied)
                        early.blocks = done
        except Exception:  # noqa: BLE001 - send() copies these blocks itself
            logger.exception("staging KV layer by layer failed; the prompts' KV goes once their prefill ends")
            self.failed = True

    def _copy(self, layer: int, early: _EarlyStaging, ids: torch.Tensor, done: int) -> None:
        """One layer's KV of blocks [early.blocks, done) of a prompt into their place in its range."""
        c = self.connector
        first, count = early.blocks * c.block_size, (done - early.blocks) * c.block_size
        for j in c.layer_tensors[layer]:
            t, per_token = c.tensors[j], c.token_bytes[j]
            start = early.offset + early.tokens * c.bytes_before[j] + first * per_token
            c.region[start:start + count * per_token].view(t.dtype).view(count, *t.shape[2:]).copy_(
                t.index_select(0, ids).reshape(count, *t.shape[2:]), non_blocking=True)


class SharedMemoryConnector(RemoteKVConnector):
    name = "SharedMemoryConnector"

    def __init__(self, config: dict, kv_caches: list, block_size: int, platform):
        super().__init__(config, kv_caches, block_size, platform)
        self.dir = os.path.join(self.extra.get("shm_dir") or default_dir(), "sageinfer-kv")
        os.makedirs(self.dir, exist_ok=True)
        self.ttl = float(self.extra.get("staged_ttl_s", 300))
        self.tensors = kv_tensors(kv_caches)
        self.token_bytes = [t[0, 0].numel() * t.element_size() for t in self.tensors]
        self.bytes_per_token = sum(self.token_bytes)  # one token's KV in every tensor, staged back to back
        device = self.tensors[0].device
        self._thread = threading.local()  # each worker's copy stream
        on_device = (lambda: platform.set_device(device.index)) if device.index is not None else None
        self.workers = ThreadPoolExecutor(max_workers=int(self.extra.get("threads", 4)), thread_name_prefix="kv-shm",
                                          initializer=on_device)
        # Prompts that go through files (no region, or one that could never hold them) on threads of
        # their own: a file is written and read an order of magnitude slower than the region, and
        # transfers through the region must not queue behind it (H200, long-prompt mix: 3 prompts in
        # files held up the rest).
        self.file_workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-shm-file", initializer=on_device)
        self.sending: dict[str, Future] = {}  # request -> its KV being staged (its blocks held)
        # request -> (its blocks being filled, what releases its staged KV if the load never starts)
        self.loads: dict[str, tuple[Future, Callable[[], object]]] = {}
        # request -> (params, tokens, first token, block ids, deadline): region loads whose KV is not yet
        # staged. They wait here, not on a thread: loads waiting for KV not staged yet must not hold up
        # the loads of KV that is (whose ranges, once read, make room for what the others wait for).
        self.awaiting: dict[str, tuple[dict, int, int, list[int], float]] = {}
        self.staged: dict[str, tuple[int, int, float, Future]] = {}  # key -> (offset, bytes, deadline, staging)
        self.mapped: dict[str, list] = {}  # region path -> [its mapping here, page-locked, loads using it]
        self._map_lock = threading.Lock()
        self.early: dict[str, _EarlyStaging] = {}  # request -> its prompt's blocks staged before send()
        # request -> (block ids, tokens, key, deadline): sent while the region had no room, oldest first
        self.waiting_for_room: dict[str, tuple[list[int], int, str, float]] = {}
        self.layer_tensors = []  # per layer, the indices of its tensors in self.tensors
        for cache in kv_caches:
            count = sum(t is not None for t in (cache.k, cache.v, cache.k_scale, cache.v_scale))
            start = sum(len(r) for r in self.layer_tensors)
            self.layer_tensors.append(range(start, start + count))
        self.bytes_before = np.cumsum([0] + self.token_bytes[:-1]).tolist()  # per tensor: a token's bytes before it
        self._layer_stream = None
        self.region = self.region_path = self.ranges = None
        self.region_pinned = False
        if self.is_producer:
            self._open_region(float(self.extra.get("staging_gb", 8)))
        self._next_region_scan = 0.0
        if self.is_consumer:
            self._map_new_regions()

    # ---- the staging region (producer) ----
    def _open_region(self, staging_gb: float) -> None:
        for name in os.listdir(self.dir):  # regions of producers that are gone
            match = _REGION.fullmatch(name)
            if match and not process_alive(int(match.group(2))):
                remove_file(os.path.join(self.dir, name))
        size = min(int(staging_gb * 2**30), shutil.disk_usage(self.dir).free // 2) // PAGE * PAGE
        if size < 16 * 2**20:
            if staging_gb > 0:
                logger.warning("no KV staging region: %s has %.2f GiB free; each prompt's KV goes through a file "
                               "of its own (slower)", self.dir, shutil.disk_usage(self.dir).free / 2**30)
            return
        self.region_path = os.path.join(self.dir, f"region-{self.engine_id}-{os.getpid()}.kv")
        start = time.perf_counter()
        self.region = torch.from_file(self.region_path, shared=True, size=size, dtype=torch.uint8)
        self.region_pinned = self._page_lock(self.region, self.region_path)
        self.ranges = ByteRanges(size)
        logger.info("KV staging region: %.2f GiB in %s (%s, %.1f s)", size / 2**30, self.region_path,
                    "page-locked" if self.region_pinned else "pageable", time.perf_counter() - start)

    def _page_lock(self, mapping: torch.Tensor, path: str) -> bool:
        """Page-lock a mapping of the file at path where it can be (a file in memory; the platform can)."""
        return on_memory_filesystem(path) and self.platform.pin_host_memory(mapping)

    def _marker(self, engine_id: str, key: str) -> str:
        """The markers' common path of a staged range (+ ".ready", ".failed", ".claim", ".done")."""
        return os.path.join(self.dir, f"{engine_id}-{key}")

    # ---- copies, on a copy stream after the engine's work enqueued so far ----
    @contextlib.contextmanager
    def _copy_stream(self, after=None):
        """A copy stream that first waits for after (an event the engine's thread recorded when it
        handed the copy over) or, without one, for what this thread's default stream has enqueued."""
        stream = getattr(self._thread, "stream", None)
        if stream is None:
            stream = self._thread.stream = self.platform.stream(self.tensors[0].device)
        before = after if after is not None else self.platform.record_event()
        with self.platform.copy_stream_context(stream):
            if before is not None:
                self.platform.wait_event(before)
            yield
        if stream is not None:
            stream.synchronize()

    def layer_stream(self):
        """The copy stream of the layer-by-layer copies, which the engine's thread enqueues."""
        if self._layer_stream is None:
            self._layer_stream = self.platform.stream(self.tensors[0].device)
        return self._layer_stream

    def _device_ids(self, block_ids: list[int]) -> torch.Tensor:
        return self.platform.to_device(np.asarray(block_ids, dtype=np.int64), self.tensors[0].device)

    def _copy_out(self, buf: torch.Tensor, block_ids: list[int], first: int, total: int, after=None) -> None:
        """The blocks' tokens, [first, first + len(block_ids) * block_size) of a staged prompt of total
        tokens, into buf (token-major, tensor after tensor)."""
        count = len(block_ids) * self.block_size
        with self._copy_stream(after):
            ids, offset = self._device_ids(block_ids), 0
            for t, per_token in zip(self.tensors, self.token_bytes):
                dst = buf[offset + first * per_token:offset + (first + count) * per_token]
                dst.view(t.dtype).view(count, *t.shape[2:]).copy_(
                    t.index_select(0, ids).reshape(count, *t.shape[2:]), non_blocking=True)
                offset += total * per_token

    def _copy_in(self, buf: torch.Tensor, total: int, first: int, block_ids: list[int]) -> None:
        """Tokens [first, first + len(block_ids) * block_size) of a staged prompt of total tokens (buf)
        into the blocks."""
        count = len(block_ids) * self.block_size
        with self._copy_stream():
            ids, offset = self._device_ids(block_ids), 0
            for t, per_token in zip(self.tensors, self.token_bytes):
                part = buf[offset + first * per_token:offset + (first + count) * per_token].view(t.dtype)
                part = part.to(t.device, non_blocking=True)
                t.index_copy_(0, ids, part.view(len(block_ids), self.block_size, *t.shape[2:]))
                offset += total * per_token

    # ---- producer ----
    def stage_step(self, parts: list[tuple[str, list[int], int, int]]) -> Callable[[int], None] | None:
        """This step's prompt tokens leave layer by layer: parts are (request, its block ids, its tokens
        computed once this step has run, its prompt's length) of the prompts this step computes that
        will be sent. Returns what the model calls after each layer (None: nothing to copy): it copies
        that layer's KV of the blocks the step completes into each prompt's range of the region, on a
        copy stream after the layer's kernels, while the next layers compute. send() is then left with
        at most the blocks of steps whose layers did not all run. Where the region has no room, nothing
        moves early (send() decides then, as without this)."""
        if self.ranges is None:
            return None
        plans = []
        for request_id, block_ids, num_computed, num_prompt in parts:
            early = self.early.get(request_id)
            if early is None:
                tokens = num_prompt // self.block_size * self.block_size
                offset = self.ranges.take(tokens * self.bytes_per_token) if tokens else None
                if offset is None:
                    continue
                early = self.early[request_id] = _EarlyStaging(offset, tokens)
            done = min(num_computed, early.tokens) // self.block_size
            if done > early.blocks:
                plans.append((early, list(block_ids[early.blocks:done]), done))
        return _LayerCopies(self, plans) if plans else None

    def drop_staged(self, request_id: str) -> None:
        """A prefill preempted or ended before send(): its copies in flight end first (its blocks are
        about to be freed and reused), then its range is given back."""
        early = self.early.pop(request_id, None)
        if early is not None:
            early.wait()
            self.ranges.give(early.offset, early.tokens * self.bytes_per_token)

    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        nb = num_tokens // self.block_size
        tokens = nb * self.block_size
        params = self.base_params(request_id, tokens)
        early = self.early.get(request_id)
        if early is not None and early.tokens != tokens:  # not the prompt it was started for
            self.drop_staged(request_id)
            early = None
        if not tokens:
            return False, params
        needed = tokens * self.bytes_per_token
        if early is not None:
            del self.early[request_id]
            key = uuid.uuid4().hex
            params.update(region=self.region_path, offset=early.offset, key=key)
            future = self.workers.submit(self._stage_in_region, list(block_ids[early.blocks:nb]), early.blocks
                                         * self.block_size, tokens, early.offset, key, early.wait,
                                         self.platform.record_event())
            self.staged[key] = (early.offset, needed, time.monotonic() + self.ttl, future)
            self.sending[request_id] = future
            self.sends_via["region_layer_by_layer"] += 1
            return True, params
        offset = None
        if self.ranges is not None:
            offset = self.ranges.take(needed)
            if offset is None:  # ranges read since the last poll may be free by now
                self._release_ranges(time.monotonic())
                offset = self.ranges.take(needed)
        if offset is not None:
            key = uuid.uuid4().hex
            params.update(region=self.region_path, offset=offset, key=key)
            future = self.workers.submit(self._stage_in_region, list(block_ids[:nb]), 0, tokens, offset, key, None,
                                         self.platform.record_event())
            self.staged[key] = (offset, needed, time.monotonic() + self.ttl, future)
            self.sends_via["region"] += 1
        elif self.ranges is not None and self.ranges.round_to_pages(needed) <= self.ranges.size:
            # Ranges free as decode instances read them (within a second under load): waiting for one
            # beats a file, written and read at a tenth of the region's speed (0.68 GB/s on an H200).
            key = uuid.uuid4().hex
            params.update(region=self.region_path, key=key)
            self.waiting_for_room[request_id] = (list(block_ids[:nb]), tokens, key,
                                                 time.monotonic() + self.load_timeout)
            self.sends_via["region_after_wait"] += 1
            return True, params
        else:
            path = os.path.join(self.dir, f"{self.engine_id}-{uuid.uuid4().hex}.kv")
            params["path"] = path
            free = shutil.disk_usage(self.dir).free
            if free < needed:  # writing past a full tmpfs would kill the process (SIGBUS), not raise
                raise ValueError(f"{self.dir} has {free / 2**30:.2f} GiB free, {needed / 2**30:.2f} GiB needed to "
                                 f"stage this prompt's KV (give the container more /dev/shm, or set shm_dir)")
            future = self.file_workers.submit(self._stage_in_file, list(block_ids[:nb]), tokens, path)
            self.sends_via["file"] += 1
        self.sending[request_id] = future
        return True, params

    def _stage_in_region(self, block_ids: list[int], first: int, tokens: int, offset: int, key: str,
                         staged_early: Callable[[], None] | None = None, after=None) -> None:
        """Tokens [first, tokens) of a prompt into its range (those before first were staged layer by
        layer: staged_early waits for those copies), then the marker that the whole range is complete."""
        try:
            if staged_early is not None:
                staged_early()
            if block_ids:
                self._copy_out(self.region[offset:offset + tokens * self.bytes_per_token], block_ids, first, tokens,
                               after)
            write_marker(self._marker(self.engine_id, key) + ".ready", json.dumps({"offset": offset}))
        except BaseException:
            create_marker(self._marker(self.engine_id, key) + ".failed")  # a consumer waiting for it gives up
            raise

    def _stage_in_file(self, block_ids: list[int], tokens: int, path: str) -> None:
        part = path + ".part"
        try:
            buf = torch.from_file(part, shared=True, size=tokens * self.bytes_per_token, dtype=torch.uint8)
            self._copy_out(buf, block_ids, 0, tokens)
            del buf
            os.rename(part, path)  # complete: a consumer waiting for it may read it now
        except BaseException:
            remove_file(part)
            open(path + ".failed", "wb").close()  # a consumer waiting for it gives up at once
            raise

    def poll_sent(self) -> list[str]:
        now = time.monotonic()
        self._release_ranges(now)
        done = self._stage_waiting(now)
        for request_id, future in list(self.sending.items()):
            if future.done():
                del self.sending[request_id]
                if future.exception() is not None:
                    logger.error("request %s: staging its KV failed: %s", request_id, future.exception())
                done.append(request_id)  # the blocks may go: their KV is staged (or never will be)
        self._remove_expired(now)
        return done

    def _stage_waiting(self, now: float) -> list[str]:
        """Prompts waiting for room go to ranges freed since, oldest first (a large prompt is not passed
        by smaller ones). Returns those that waited past their deadline: their consumer is told it
        failed (it computes the prompt), and their blocks may go."""
        gone = []
        for request_id, (block_ids, tokens, key, deadline) in list(self.waiting_for_room.items()):
            needed = tokens * self.bytes_per_token
            offset = self.ranges.take(needed)
            if offset is None:
                if now <= deadline:
                    break
                logger.warning("request %s: no room in the KV staging region within %.0f s; its KV is not sent",
                               request_id, self.load_timeout)
                create_marker(self._marker(self.engine_id, key) + ".failed")
                del self.waiting_for_room[request_id]
                gone.append(request_id)
                continue
            del self.waiting_for_room[request_id]
            future = self.workers.submit(self._stage_in_region, block_ids, 0, tokens, offset, key, None,
                                         self.platform.record_event())
            self.staged[key] = (offset, needed, now + self.ttl, future)
            self.sending[request_id] = future
        return gone

    def _release_ranges(self, now: float) -> None:
        """Ranges read by their consumer, or never claimed within staged_ttl_s, or claimed by a
        consumer that has not finished within load_timeout_s after (it died), go back to the region."""
        for key, (offset, n, deadline, future) in list(self.staged.items()):
            if not future.done():
                continue
            marker = self._marker(self.engine_id, key)
            if not os.path.exists(marker + ".done"):
                if now <= deadline:
                    continue
                if not create_marker(marker + ".claim"):  # a consumer claimed it: is it still reading?
                    try:
                        claimed = os.path.getmtime(marker + ".claim")
                    except FileNotFoundError:
                        continue
                    if time.time() - claimed <= self.load_timeout:
                        continue
                logger.warning("KV staged for key %s was not read within %.0f s: its range is freed", key, self.ttl)
                kinds = ("ready", "failed")  # the .claim stays: a consumer that comes late fails at once
            else:
                kinds = ("ready", "failed", "claim", "done")
            for kind in kinds:
                remove_file(f"{marker}.{kind}")
            del self.staged[key]
            self.ranges.give(offset, n)

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
                        if not full.endswith(".claim"):
                            logger.warning("KV staged in %s was not read within %.0f s: removed", full, self.ttl)
                        remove_file(full)
                except FileNotFoundError:
                    pass

    # ---- consumer ----
    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        reason = self.offer_mismatch(params, first_token, len(block_ids) * self.block_size)
        region, path = params.get("region"), params.get("path")
        where = region if region is not None else path
        if reason is None and (not isinstance(where, str) or os.path.dirname(where) != self.dir):
            reason = f"the staged KV is not under this host's {self.dir}"
        if reason is None and region is not None:
            reason = self._region_mismatch(params)
        if reason is not None:
            if region is None and isinstance(path, str) and os.path.dirname(path) == self.dir:
                remove_file(path)
            raise ValueError(reason)
        total = int(params["remote_num_tokens"])
        if region is not None:
            # started by poll_loaded once staged
            self.awaiting[request_id] = (params, total, first_token, list(block_ids), time.monotonic() + self.load_timeout)
        else:
            future = self.file_workers.submit(self._load_from_file, path, total, first_token, block_ids)
            self.loads[request_id] = (future, lambda: remove_file(path))

    def _region_mismatch(self, params: dict, offset=None) -> str | None:
        """Why the staged KV that params name can't be read from its region, or None. offset: the
        range's, where params leave it to the .ready marker (checked once that is there)."""
        region, key = params["region"], params.get("key")
        offset = params.get("offset", offset)
        deferred = "offset" not in params and offset is None
        engine = params.get("remote_engine_id")
        if not _REGION.fullmatch(os.path.basename(region)) or not os.path.exists(region):
            return "the prefill instance's staging region is not there"
        if not isinstance(engine, str) or not _NAME.fullmatch(engine) or not isinstance(key, str) \
                or not _KEY.fullmatch(key):
            return "kv_transfer_params name no staged KV"
        size = int(params["remote_num_tokens"]) * self.bytes_per_token
        try:
            region_size = os.path.getsize(region)
        except OSError:
            return "the prefill instance's staging region is not there"
        if not deferred and (not isinstance(offset, int) or offset < 0 or offset + size > region_size):
            return "the staged KV lies outside the prefill instance's staging region"
        return None

    def _wait_for(self, ready: str, failed: str) -> None:
        """Until a file the producer is still writing is complete (region loads start once staged)."""
        deadline = time.monotonic() + self.load_timeout
        while not os.path.exists(ready):
            if os.path.exists(failed):
                remove_file(failed)
                raise ValueError("the prefill instance could not stage this prompt's KV")
            if time.monotonic() > deadline:
                raise ValueError(f"the staged KV did not appear within {self.load_timeout:.0f} s")
            time.sleep(0.001)

    def _load_from_region(self, params: dict, total: int, first: int, block_ids: list[int]) -> None:
        engine, key = params["remote_engine_id"], params["key"]
        marker = self._marker(engine, key)  # its .ready is there: _start_staged saw it
        if not create_marker(marker + ".claim"):
            raise ValueError("the prefill instance no longer holds this prompt's staged KV")
        try:
            offset = params.get("offset")
            if offset is None:  # staged once the region had room: the marker says where
                with open(marker + ".ready") as f:
                    offset = json.load(f).get("offset")
                if not isinstance(offset, int):
                    raise ValueError("the prefill instance's staging marker names no range")
                reason = self._region_mismatch(params, offset)
                if reason is not None:
                    raise ValueError(reason)
            with self._mapped_region(params["region"]) as region:
                self._copy_in(region[offset:offset + total * self.bytes_per_token], total, first, block_ids)
        finally:
            create_marker(marker + ".done")  # the producer may reuse the range

    def _map_new_regions(self) -> None:
        """Map (and page-lock) the regions of live producers that have appeared since the last look,
        in the background: page-locking gigabytes takes about a second, which the first load from a
        region would otherwise wait for. Looked for at most once a second."""
        now = time.monotonic()
        if now < self._next_region_scan:
            return
        self._next_region_scan = now + 1.0
        for name in os.listdir(self.dir):
            match = _REGION.fullmatch(name)
            path = os.path.join(self.dir, name)
            if match and path != self.region_path and path not in self.mapped and process_alive(int(match.group(2))):
                self.workers.submit(self._premap, path)
        if self._map_lock.acquire(blocking=False):  # (a load holding it drops them itself)
            try:
                self._unmap_gone()
            finally:
                self._map_lock.release()

    def _premap(self, path: str) -> None:
        with self._map_lock:
            try:
                self._map_region(path)
            except OSError:  # its producer closed meanwhile
                pass

    def _unmap_gone(self, keep: str | None = None) -> None:
        """Drop mappings of regions whose files are gone (their producers closed) and that no load
        uses: the mapping alone would keep the region's memory; _map_lock held."""
        for gone in [p for p, (_, _, users) in self.mapped.items()
                     if p != keep and not users and not os.path.exists(p)]:
            self._unmap(gone)

    def _map_region(self, path: str) -> list:
        """path's mapping here ([region, page-locked, loads using it]), made the first time; _map_lock held."""
        if path not in self.mapped:
            region = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
            self.mapped[path] = [region, self._page_lock(region, path), 0]
        return self.mapped[path]

    @contextlib.contextmanager
    def _mapped_region(self, path: str):
        """A producer's region mapped here (once; page-locked where the platform can) for the copies
        of one load."""
        with self._map_lock:
            self._unmap_gone(keep=path)
            entry = self._map_region(path)
            entry[2] += 1
        try:
            yield entry[0]
        finally:
            with self._map_lock:
                entry[2] -= 1

    def _unmap(self, path: str) -> None:
        region, pinned, _ = self.mapped.pop(path)
        if pinned:
            self.platform.unpin_host_memory(region)

    def _load_from_file(self, path: str, total: int, first: int, block_ids: list[int]) -> None:
        self._wait_for(path, path + ".failed")
        try:
            size = os.path.getsize(path)
            if size != total * self.bytes_per_token:
                raise ValueError(f"the staged KV file has {size} bytes, {total * self.bytes_per_token} expected")
            self._copy_in(torch.from_file(path, shared=False, size=size, dtype=torch.uint8), total, first, block_ids)
        finally:
            remove_file(path)

    def _start_staged(self) -> list[tuple[str, str]]:
        """Loads whose KV is now staged start on a thread. Returns those whose producer failed or gave
        the range up, or that waited past load_timeout_s, with the reason."""
        failed, now = [], time.monotonic()
        for request_id, (params, total, first, block_ids, deadline) in list(self.awaiting.items()):
            marker = self._marker(params["remote_engine_id"], params["key"])
            if os.path.exists(marker + ".ready"):
                del self.awaiting[request_id]
                future = self.workers.submit(self._load_from_region, params, total, first, block_ids)
                self.loads[request_id] = (future, lambda m=marker: release_unread(m))
                continue
            if os.path.exists(marker + ".failed"):
                reason = "the prefill instance could not stage this prompt's KV"
            elif os.path.exists(marker + ".claim"):
                reason = "the prefill instance no longer holds this prompt's staged KV"
            elif now > deadline:
                reason = f"the staged KV did not appear within {self.load_timeout:.0f} s"
                release_unread(marker)
            else:
                continue
            del self.awaiting[request_id]
            failed.append((request_id, f"ValueError: {reason}"))
        return failed

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        if self.is_consumer:
            self._map_new_regions()
        return self._start_staged() + self.take_finished(self.loads)

    def cancel_load(self, request_id: str) -> bool:
        waiting = self.awaiting.pop(request_id, None)
        if waiting is not None:
            release_unread(self._marker(waiting[0]["remote_engine_id"], waiting[0]["key"]))
            return True
        future, release = self.loads.get(request_id, (None, None))
        if future is None:
            return True
        if future.cancel():  # not started: nothing writes the blocks
            del self.loads[request_id]
            release()
            return True
        return False  # being written: the blocks are freed when poll_loaded reports it

    def close(self) -> None:
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.file_workers.shutdown(wait=True, cancel_futures=True)
        with self._map_lock:
            for path in list(self.mapped):
                self._unmap(path)
        for name in os.listdir(self.dir):
            if name.startswith(self.engine_id):
                remove_file(os.path.join(self.dir, name))
        if self.region is not None:
            if self.region_pinned:
                self.platform.unpin_host_memory(self.region)
            self.region = None
            remove_file(self.region_path)
