"""Same-host KV transfer device to device: the prefill instance exports its KV cache once (CUDA IPC
handles on NVIDIA and AMD GPUs, a shared-memory mapping on the CPU: the platform's
share_memory_handle), a decode instance maps it and copies a prompt's tokens straight from the
producer's blocks into its own (one gather per cache tensor, on the same GPU or from an NVLink peer).
Nothing is staged: the KV crosses once, at the device's copy bandwidth.

The producer holds a request's blocks until the consumer has read them. They agree through files in
a private directory of this host, `{engine}/{key}.offer|.claim|.done`:
  - the producer writes .offer (which of its blocks hold the prompt): the consumer reads only what an
    offer names, whatever the request's kv_transfer_params say;
  - the consumer creates .claim (O_EXCL) before it reads; the producer creates it when it stops
    holding (abort_timeout_s): whoever is first decides, so blocks being read are never freed;
  - the consumer creates .done when it has read (or failed): the producer frees the blocks;
  - a consumer that claimed and died: the producer frees load_timeout_s after the claim.
Files older than any live offer are swept, and every file of an instance whose process is gone.
Block sizes may differ (copies in runs of their common divisor).

Tensor parallelism: every rank exports its cache (`handles.{rank}`), and the decode instance's rank 0
fills each of its ranks' KV heads from whichever rank of the prefill instance holds them, all from
its thread (so the ranks must be on this host, and their devices visible to rank 0: on a GPU, rank 0
then holds a context on each of them). The two tensor-parallel sizes may differ: heads are copied by
their index in the model, so a prefill instance at tp=1 serves decode instances at tp=2, and so on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from sageinfer.transport.kv_pairing import per_model_tensors
from sageinfer.transport.marker_files import create_marker, default_dir, process_alive, release_unread, remove_file
from sageinfer.transport.remote_kv import RemoteKVConnector, kv_tensors

logger = logging.getLogger(__name__)
_NAME = re.compile(r"[0-9A-Za-z_.-]{1,128}")
_KEY = re.compile(r"[0-9a-f]{1,64}")


def _directory(config: dict) -> str:
    """This user's private directory of exported caches and offers (made if missing)."""
    extra = config["kv_connector_extra_config"]
    engine_id = config["engine_id"]
    if not _NAME.fullmatch(engine_id) or engine_id.startswith("."):
        raise ValueError(f"DeviceIpcConnector: engine_id {engine_id!r} must be letters, digits, '_', '.', '-'")
    root = os.path.join(extra.get("ipc_dir") or default_dir(), f"sageinfer-ipc-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    if os.stat(root).st_uid != os.getuid() or os.stat(root).st_mode & 0o077:
        raise ValueError(f"DeviceIpcConnector: {root} must be this user's alone (mode 0700)")
    os.makedirs(os.path.join(root, engine_id), exist_ok=True)
    return root


def _export(root: str, engine_id: str, rank: int, tensors: list[torch.Tensor], platform) -> None:
    """Write the handles through which other processes of this host map a rank's cache."""
    try:
        handles = [platform.share_memory_handle(t) for t in tensors]
    except NotImplementedError as exc:
        raise ValueError(f"DeviceIpcConnector: {exc}; use SharedMemoryConnector or TorchDistributedConnector "
                         f"on this platform") from exc
    path = os.path.join(root, engine_id, f"handles.{rank}")
    with open(f"{path}.{os.getpid()}.part", "wb") as f:
        pickle.dump({"pid": os.getpid(), "handles": handles}, f)
    os.replace(f"{path}.{os.getpid()}.part", path)


def export_rank_cache(config: dict, kv_caches: list, platform, rank: int) -> None:
    """A tensor-parallel rank's cache (rank > 0), for the connector on rank 0."""
    _export(_directory(config), config["engine_id"], rank, kv_tensors(kv_caches), platform)


def _abandoned(engine_dir: str) -> bool:
    """Whether a producer's directory outlived it: the process its handles name is gone (or it never
    wrote them, long ago)."""
    try:
        with open(os.path.join(engine_dir, "handles.0"), "rb") as f:
            return not process_alive(int(pickle.load(f)["pid"]))
    except FileNotFoundError:
        return time.time() - os.path.getmtime(engine_dir) > 600
    except Exception:  # noqa: BLE001 - an unreadable file: no live owner to protect
        return True


def _head_plan(ours: tuple[int, int], theirs: list) -> list[tuple[int, int, int, int]] | None:
    """How one rank's KV heads (first, count of the model's) come from ranks holding theirs[q] =
    (first, count) each: [(rank q, its first local head, our first local head, heads)], in runs as long
    as one rank holds them; None if some head is held by none."""
    first, count = ours
    plan, head = [], first
    while head < first + count:
        holder = next((q for q, (f, c) in enumerate(theirs) if f <= head < f + c), None)
        if holder is None:
            return None
        f, c = theirs[holder]
        n = min(first + count, f + c) - head
        plan.append((holder, head - f, head - first, n))
        head += n
    return plan


def _runs(block_ids: list[int], block_size: int, first: int, count: int, run: int) -> np.ndarray:
    """Indexes of the runs of `run` tokens that hold tokens [first, first + count) of a prompt stored
    in block_ids (block i holding tokens [i * block_size, (i + 1) * block_size)), in a cache viewed as
    [blocks * block_size / run, run, ...]."""
    token = np.arange(first, first + count, run)
    per_block = block_size // run
    return np.asarray(block_ids, dtype=np.int64)[token // block_size] * per_block + (token % block_size) // run


class DeviceIpcConnector(RemoteKVConnector):
    name = "DeviceIpcConnector"

    def __init__(self, config: dict, kv_caches: list, block_size: int, platform, tensor_parallel_size: int = 1,
                 kv_heads_by_rank: list[tuple[int, int]] | None = None):
        """kv_heads_by_rank: per rank, (first, count) of the model's KV heads its cache holds (default:
        one rank holding all)."""
        super().__init__(config, kv_caches, block_size, platform)
        self.dir = _directory(config)
        self.tp = tensor_parallel_size
        self.tensors = kv_tensors(kv_caches)
        self.kv_heads = [tuple(r) for r in kv_heads_by_rank] if kv_heads_by_rank else [(0, self.tensors[0].shape[2])]
        self.held: dict[str, tuple[str, float]] = {}  # request -> (key, when the offer expires, monotonic)
        self.claimed_at: dict[str, float] = {}  # request -> when a consumer's claim was first seen
        self.loads: dict[str, tuple[Future, str]] = {}  # request -> (its copy, marker prefix)
        # (engine, rank) -> (its handles file's inode and mtime, its pid, its cache mapped here)
        self.mapped: dict[tuple[str, int], tuple[tuple, int, list[torch.Tensor]]] = {}
        self.streams: dict[torch.device, object] = {}
        self.workers = ThreadPoolExecutor(max_workers=int(self.extra.get("threads", 2)), thread_name_prefix="kv-ipc")
        _export(self.dir, self.engine_id, 0, self.tensors, platform)
        _LOCAL[self.engine_id] = self.tensors

    def _handles_path(self, engine_id: str, rank: int = 0) -> str:
        return os.path.join(self.dir, engine_id, f"handles.{rank}")

    def _marker(self, engine_id: str, key: str) -> str:
        return os.path.join(self.dir, engine_id, key)

    # ---- producer ----
    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        nb = num_tokens // self.block_size
        params = self.base_params(request_id, nb * self.block_size)
        if not nb:
            return False, params
        key = uuid.uuid4().hex
        marker = self._marker(self.engine_id, key)
        with open(marker + ".part", "w") as f:
            json.dump({"block_ids": list(block_ids[:nb]), "num_tokens": nb * self.block_size}, f)
        os.replace(marker + ".part", marker + ".offer")
        params.update(remote_key=key, remote_tp_size=self.tp, remote_kv_heads=[list(r) for r in self.kv_heads])
        self.held[request_id] = (key, time.monotonic() + self.abort_timeout)
        self.sends_via["device_ipc"] += 1
        return True, params

    def poll_sent(self) -> list[str]:
        if not self.is_producer:
            return []
        done, now = [], time.monotonic()
        for request_id, (key, expires) in list(self.held.items()):
            marker = self._marker(self.engine_id, key)
            if os.path.exists(marker + ".done"):
                remove_file(marker + ".done")
                remove_file(marker + ".claim")
            elif now <= expires:
                continue
            elif create_marker(marker + ".claim"):  # no consumer came: this producer stops holding
                logger.warning("KV of request %s was not read within %g s: its blocks are freed",
                               request_id, self.abort_timeout)
            elif now - self.claimed_at.setdefault(request_id, now) <= self.load_timeout:
                continue  # a consumer is reading it
            else:
                logger.warning("request %s: the decode instance that began reading its KV never finished: "
                               "its blocks are freed", request_id)
            remove_file(marker + ".offer")
            del self.held[request_id]
            self.claimed_at.pop(request_id, None)
            done.append(request_id)
        self._sweep()
        return done

    def _sweep(self) -> None:
        """Files of this producer older than any offer it still holds go (a claim marker left by a
        consumer that came too late, say), and every file of an instance whose process is gone."""
        now = time.monotonic()
        if now < getattr(self, "_next_sweep", 0.0):
            return
        self._next_sweep = now + 10.0
        cutoff = time.time() - self.abort_timeout - self.load_timeout - 60
        for engine in os.listdir(self.dir):
            try:
                if engine != self.engine_id and _abandoned(os.path.join(self.dir, engine)):
                    shutil.rmtree(os.path.join(self.dir, engine), ignore_errors=True)
            except FileNotFoundError:
                pass
        own = os.path.join(self.dir, self.engine_id)
        for name in os.listdir(own):
            try:
                if not name.startswith("handles.") and os.path.getmtime(os.path.join(own, name)) < cutoff:
                    remove_file(os.path.join(own, name))
            except FileNotFoundError:
                pass

    # ---- consumer ----
    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        count = len(block_ids) * self.block_size
        reason = self.offer_mismatch(params, first_token, count)
        engine, key, remote_bs = params.get("remote_engine_id"), params.get("remote_key"), params.get("remote_block_size")
        if reason is None and not (isinstance(engine, str) and _NAME.fullmatch(engine) and not engine.startswith(".")
                                   and isinstance(key, str) and _KEY.fullmatch(key)):
            reason = "kv_transfer_params name no DeviceIpcConnector offer (remote_engine_id, remote_key)"
        if reason is None and not (isinstance(remote_bs, int) and remote_bs > 0):
            reason = "kv_transfer_params carry no remote_block_size"
        if reason is None and not os.path.exists(self._handles_path(engine)):
            reason = f"no prefill instance {engine!r} has exported its KV cache on this host ({self.dir})"
        plans = [] if reason else [_head_plan(ours, params["remote_kv_heads"]) for ours in self.kv_heads]
        if None in plans:
            reason = f"the prefill instance's ranks hold not every KV head this one needs ({params['remote_kv_heads']})"
        if reason is not None:
            raise ValueError(reason)
        marker = self._marker(engine, key)
        future = self.workers.submit(self._load, engine, marker, remote_bs, first_token, block_ids, plans)
        self.loads[request_id] = (future, marker)

    def _cache(self, engine: str, rank: int) -> list[torch.Tensor]:
        """A rank's cache tensors of an instance on this host, mapped here (once per process of it: the
        handles file is read again only when it has been rewritten)."""
        if engine == self.engine_id and rank == 0:
            return self.tensors
        path = self._handles_path(engine, rank)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise ValueError(f"rank {rank} of instance {engine!r} has not exported its KV cache") from None
        identity = (stat.st_ino, stat.st_mtime_ns)
        cached = self.mapped.get((engine, rank))
        if cached is None or cached[0] != identity:
            with open(path, "rb") as f:
                exported = pickle.load(f)  # written by a process of this user, in a directory only it may write
            pid = exported["pid"]
            if not process_alive(pid):
                raise ValueError(f"rank {rank} of instance {engine!r} (pid {pid}) is gone")
            # both instances in one process: no mapping needed (nor allowed, for CUDA IPC)
            tensors = _LOCAL[engine] if pid == os.getpid() else [self.platform.open_memory_handle(h)
                                                                 for h in exported["handles"]]
            cached = self.mapped[(engine, rank)] = (identity, pid, tensors)
        elif not process_alive(cached[1]):  # (its memory must not be read once it is gone)
            raise ValueError(f"rank {rank} of instance {engine!r} (pid {cached[1]}) is gone")
        return cached[2]

    def _stream(self, device: torch.device):
        if device not in self.streams:
            self.streams[device] = self.platform.stream(device)
        return self.streams[device]

    def offer_mismatch(self, params: dict, first_token: int, num_tokens: int) -> str | None:
        """As the base's, but per model rather than per rank: the instances' tensor-parallel sizes may
        differ, so their caches must agree in all but how many KV heads each rank holds."""
        theirs, heads = params.get("remote_layout"), params.get("remote_kv_heads")
        if not isinstance(theirs, dict) or not isinstance(theirs.get("tensors"), list):
            return "kv_transfer_params carry no KV layout"
        if not (isinstance(heads, list) and heads and all(
                isinstance(h, list) and len(h) == 2 and all(isinstance(v, int) and v >= 0 for v in h) for h in heads)):
            return "kv_transfer_params carry no remote_kv_heads"
        if per_model_tensors(theirs["tensors"]) != per_model_tensors(self.layout["tensors"]) \
                or theirs.get("fp8_scales") != self.layout["fp8_scales"]:
            return (f"the prefill instance's KV cache differs (layers, head size, kv_cache_dtype or FP8 scales): "
                    f"{len(theirs['tensors'])} tensors {(theirs['tensors'] or [None])[0]} vs "
                    f"{len(self.layout['tensors'])} tensors {self.layout['tensors'][0]} here")
        total = max(f + c for f, c in self.kv_heads)
        if max(f + c for f, c in heads) != total:
            return f"the prefill instance's model has other KV heads ({heads}) than this one ({total})"
        if first_token + num_tokens > int(params.get("remote_num_tokens") or 0):
            return "the prefill instance offers fewer tokens than asked for"
        return None

    def _load(self, engine: str, marker: str, remote_bs: int, first: int, block_ids: list[int],
              plans: list[list[tuple[int, int, int, int]]]) -> None:
        if not os.path.exists(marker + ".offer"):
            raise ValueError("the prefill instance holds no KV under this key (never offered, or already freed)")
        if not create_marker(marker + ".claim"):
            raise ValueError("this prompt's KV was already read, or given up by the prefill instance")
        try:
            with open(marker + ".offer") as f:
                offer = json.load(f)  # read after the claim: the blocks it names stay held now
            remote_blocks = offer["block_ids"]
            count = len(block_ids) * self.block_size
            if first + count > offer["num_tokens"] or len(remote_blocks) * remote_bs < offer["num_tokens"]:
                raise ValueError("the prefill instance's offer holds fewer tokens than asked for")
            run = math.gcd(self.block_size, remote_bs, first)
            src_runs = torch.from_numpy(_runs(remote_blocks, remote_bs, first, count, run))
            dst_runs = torch.from_numpy(_runs(block_ids, self.block_size, 0, count, run))
            streams = []
            for rank, plan in enumerate(plans):  # each rank's heads, from the prefill ranks that hold them
                target = self._cache(self.engine_id, rank)
                stream = self._stream(target[0].device)
                streams.append(stream)
                with self.platform.copy_stream_context(stream):
                    dst_idx = dst_runs.to(target[0].device)
                    for source_rank, src_head, dst_head, heads in plan:
                        source = self._cache(engine, source_rank)
                        if len(source) != len(target):
                            raise ValueError("the prefill instance's exported cache does not match its offer")
                        src_idx = src_runs.to(source[0].device)
                        for s, d in zip(source, target):
                            rows = s.view(-1, run, *s.shape[2:])[:, :, src_head:src_head + heads].index_select(0, src_idx)
                            d.view(-1, run, *d.shape[2:])[:, :, dst_head:dst_head + heads].index_copy_(
                                0, dst_idx, rows.to(d.device))
            for stream in streams:
                if stream is not None:
                    stream.synchronize()  # filled before the engine is told (and schedules a step on them)
        finally:
            create_marker(marker + ".done")  # the producer may free its blocks

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        return self.take_finished(self.loads)

    def cancel_load(self, request_id: str) -> bool:
        future, marker = self.loads.get(request_id, (None, None))
        if future is None:
            return True
        if future.cancel():  # not started: nothing writes the blocks; the producer may free its own
            del self.loads[request_id]
            release_unread(marker)
            return True
        return False  # being copied: the blocks are freed when poll_loaded reports it

    def close(self) -> None:
        self.workers.shutdown(wait=True, cancel_futures=True)
        if _LOCAL.get(self.engine_id) is self.tensors:
            del _LOCAL[self.engine_id]
            shutil.rmtree(os.path.join(self.dir, self.engine_id), ignore_errors=True)


# The caches exported by this process, by engine id (a consumer in the same process reads them directly).
_LOCAL: dict[str, list[torch.Tensor]] = {}
