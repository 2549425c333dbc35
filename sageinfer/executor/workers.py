"""Tensor-parallel ranks 1..N-1, each in a process of its own with its device and model shard.

Rank 0 runs in the engine, beside the scheduler. Every step it sends the other ranks a step message
(`step_message.StepMessage`, msgspec over a ZMQ socket per worker) and then all ranks run the same
forward, meeting in the collectives. The ranks start with multiprocessing (spawn) on one host; they
size the KV cache alike (the smallest any rank can hold) and capture the same graphs.

A worker that dies leaves the others waiting in a collective that will never complete, so a watchdog
ends the engine's process at once (exit 1): the server in front of it reports the death and exits.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import tempfile
import threading
import time

import msgspec
import torch
import zmq

from sageinfer.config import EngineConfig
from sageinfer.executor import step_message as sm
from sageinfer.executor.offload_mirror import replay

logger = logging.getLogger(__name__)

_WATCH_SECONDS = 0.5
# A rank that dies while the engine starts has usually hit what rank 0 is about to hit too (a bad
# checkpoint, too little memory): rank 0 gets this long to raise its own error before the watchdog
# ends the process (a collective waiting for the dead rank would never return).
_START_GRACE_SECONDS = 10.0


def agree_on_num_blocks(num_blocks: int, device: torch.device) -> int:
    """The smallest KV cache any rank can hold: the ranks' caches must be the same size."""
    import torch.distributed as dist
    value = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


class TensorParallelWorkers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, config: EngineConfig, attention_backend: str | None, eos_token_ids: set[int]):
        size = config.tensor_parallel_size
        ray_backend = config.distributed_executor_backend == "ray"
        self._context = zmq.Context()
        self._sockets = []
        if ray_backend:  # ranks anywhere in a Ray cluster: TCP for the steps and the rendezvous
            from sageinfer.executor.ray_ranks import RayRanks, node_address
            host = node_address()
            self.init_method = f"tcp://{host}:{_free_port()}"
            addresses = [f"tcp://{host}:{_free_port()}" for _ in range(1, size)]
            self.ranks = RayRanks(config)
        else:  # ranks on this host: processes, a Unix socket each, a rendezvous file
            directory = tempfile.mkdtemp(prefix="sageinfer-tp-")
            self.init_method = f"file://{directory}/rendezvous"
            addresses = [f"ipc://{directory}/rank{rank}" for rank in range(1, size)]
            self.ranks = ProcessRanks()
        for rank, address in enumerate(addresses, start=1):
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind(address if not ray_backend else "tcp://*:" + address.rsplit(":", 1)[1])
            self._sockets.append(socket)
            self.ranks.start(rank, (rank, config, attention_backend, sorted(eos_token_ids), self.init_method, address,
                                    None if ray_backend else os.getpid()))
        self._encoder = msgspec.msgpack.Encoder()
        self.builder = sm.StepMessageBuilder()
        self._stopping = False
        self.started = False  # set by the engine once every rank is up: then a death ends it at once
        threading.Thread(target=self._watch, name="sageinfer-tp-watchdog", daemon=True).start()
        atexit.register(self.shutdown)  # before multiprocessing ends the daemons, so the watchdog stays quiet

    def send_step(self, scheduled: list, use_prev_tokens: bool, offload: list | None = None,
                  defer_token_masks: bool = False) -> None:
        self._send(self.builder.build(scheduled, use_prev_tokens, offload, defer_token_masks))

    def send_token_masks(self, sampled_requests: list) -> None:
        """The masks a step sent with defer_token_masks waits for (its ranks then draw)."""
        self._send(self.builder.build_token_masks(sampled_requests))

    def send_warm_up(self, first: int, rest: int) -> None:
        self._send(sm.WarmUp(first, rest))

    def _send(self, message) -> None:
        data = self._encoder.encode(message)
        for socket in self._sockets:
            socket.send(data)

    def _watch(self) -> None:
        while not self._stopping:
            for rank in range(1, len(self._sockets) + 1):
                if not self.ranks.alive(rank) and not self._stopping and not self.started:
                    deadline = time.monotonic() + _START_GRACE_SECONDS
                    while time.monotonic() < deadline and not self._stopping:
                        time.sleep(0.1)
                if not self.ranks.alive(rank) and not self._stopping:
                    logger.error("tensor-parallel rank %d is gone (%s); the engine cannot go on", rank,
                                 self.ranks.why(rank))
                    os._exit(1)
            time.sleep(_WATCH_SECONDS)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        data = self._encoder.encode(sm.Shutdown())
        for socket in self._sockets:
            try:
                socket.send(data, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.ranks.stop(timeout)
        for socket in self._sockets:
            socket.close(linger=0)
        self._context.term()


class ProcessRanks:
    """Ranks as spawned processes on this host."""

    def __init__(self):
        self.processes: dict[int, multiprocessing.Process] = {}

    def start(self, rank: int, args: tuple) -> None:
        process = multiprocessing.get_context("spawn").Process(target=run_worker, name=f"sageinfer-tp-rank{rank}",
                                                               daemon=True, args=args)
        process.start()
        logger.info("tensor-parallel rank %d: process %d", rank, process.pid)
        self.processes[rank] = process

    def alive(self, rank: int) -> bool:
        return self.processes[rank].is_alive()

    def why(self, rank: int) -> str:
        return f"exit code {self.processes[rank].exitcode}"

    def stop(self, timeout: float) -> None:
        for process in self.processes.values():
            process.join(timeout)
            if process.is_alive():
                process.kill()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_worker(rank: int, config: EngineConfig, attention_backend: str | None, eos_token_ids: list[int],
               init_method: str, address: str, parent_pid: int | None, device_index: int | None = None) -> None:
    """A rank's process: join the group, build the shard, then run each step rank 0 announces.
    parent_pid: rank 0's, watched (None where another system owns the process, as Ray does);
    device_index: the device to use (default: the rank's own)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp rank {rank}: %(message)s")
    from sageinfer.config import parse_dtype
    from sageinfer.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
    from sageinfer.executor.model_runner import ModelRunner
    from sageinfer.frozen_heap import freeze_start_up_heap
    from sageinfer.models.model_config import load_model_config
    from sageinfer.platforms import get_platform

    platform = get_platform(config.device)
    platform.set_device(rank if device_index is None else device_index)
    init_tensor_parallel(rank, config.tensor_parallel_size, platform.dist_backend, init_method)
    torch.manual_seed(config.seed)  # the same random state as rank 0: unseeded draws agree
    model_config = load_model_config(config.model)
    runner = ModelRunner(config, model_config, platform, parse_dtype(config.dtype, model_config.dtype),
                         attention_backend, show_progress=False)
    runner.start_kernel_warm_up(attention=False)  # the quantized layers; attention started while loading
    runner.allocate_kv_cache(agree_on_num_blocks(runner.determine_num_blocks(), runner.device))
    if config.kv_transfer_config is not None:  # rank 0's connector reaches this rank's cache too
        from sageinfer.transport.kv_transfer_config import export_rank_cache
        export_rank_cache(config.kv_transfer_config, runner.kv_caches, platform, rank)
    runner.finish_kernel_warm_up()
    runner.capture_graphs()
    runner.warm_up_logits()
    freeze_start_up_heap()  # kept out of the collector's full passes while serving
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.connect(address)
    decoder = msgspec.msgpack.Decoder(sm.WorkerCommand)
    requests = sm.WorkerRequests(set(eos_token_ids), runner.device)
    prev_tokens = pending = None  # pending: a step launched with its draw deferred (until TokenMasks)
    offload = None  # this rank's offload tier, built at rank 0's first copy
    while True:
        if not socket.poll(1000):
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.error("rank 0 is gone; exiting")
                os._exit(1)
            continue
        message = decoder.decode(socket.recv())
        if isinstance(message, sm.Shutdown):
            break
        if isinstance(message, sm.WarmUp):
            runner.warm_up_long_prefill(message.first, message.rest)
            continue
        if isinstance(message, sm.TokenMasks):  # the draw of the step launched before it
            requests.apply_masks(message)
            output = runner.sample_pending(pending)
            prev_tokens = output.token_ids if output is not None else None
            continue
        if message.offload:  # rank 0's offload copies, before this step as there
            offload = replay(offload, message.offload, runner.kv_caches, platform)
        scheduled = requests.apply(message)
        result = runner.execute(scheduled, prev_tokens if message.use_prev_tokens else None,
                                defer_token_masks=message.defer_token_masks)
        pending = result
        prev_tokens = result.sampler_output.token_ids if result.sampler_output is not None else None
    socket.close(linger=0)
    context.term()
    runner.release_graphs()
    destroy_tensor_parallel()
