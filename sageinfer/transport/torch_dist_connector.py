"""KV transfer over torch.distributed point-to-point (gloo on CPUs; NCCL or a vendor's collective
library where the platform names one): the fallback every platform has.

The prefill instance listens on a TCP port for decode instances and hosts a TCPStore. A decode
instance that first needs KV from it connects, and the two form a process group of their own (two
ranks, not the instances' tensor-parallel groups). Each load is a request over that connection
(which prompt, which tokens) answered by one send per cache tensor; the prefill instance then frees
the request's blocks. Tokens are sent token-major, so block sizes may differ. A device's collective
library joins two processes on two devices only (NCCL refuses two ranks on one GPU): a pair whose
instances share a device goes over gloo through host memory instead (the shared-memory connector
serves that case faster).
"""
from __future__ import annotations

import datetime
import json
import logging
import queue
import socket
import threading
import time
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist

from sageinfer.transport.remote_kv import RemoteKVConnector, kv_tensors

logger = logging.getLogger(__name__)


def _send_json(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _recv_json(reader) -> dict:
    line = reader.readline()
    if not line:
        raise ConnectionError("the peer closed the connection")
    return json.loads(line)


def _process_group(backend: str, store, rank: int, timeout: datetime.timedelta):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    raise ValueError(f"TorchDistributedConnector: no point-to-point backend {backend!r} here (gloo, nccl)")


class TorchDistributedConnector(RemoteKVConnector):
    name = "TorchDistributedConnector"

    def __init__(self, config: dict, kv_caches: list, block_size: int, platform):
        super().__init__(config, kv_caches, block_size, platform)
        self.tensors = kv_tensors(kv_caches)
        self.backend = self.extra.get("backend") or platform.dist_backend
        self.connect_timeout = datetime.timedelta(seconds=float(self.extra.get("connect_timeout_s", 30)))
        self.host = self.extra.get("host", "127.0.0.1")
        self.lock = threading.Lock()
        self.offers: dict[str, tuple[list[int], int, float]] = {}  # request -> (blocks, tokens, deadline)
        self.sent: list[str] = []
        self.links: dict[tuple[str, int], _Link] = {}
        self.loads: dict[str, Future] = {}
        self.closed = False
        if self.is_producer:
            self.store = dist.TCPStore(self.host, int(self.extra.get("store_port", 0)), None, True,
                                       timeout=self.connect_timeout, wait_for_workers=False)
            self.listener = socket.create_server((self.host, int(self.extra.get("port", 0))))
            self.port = self.listener.getsockname()[1]
            self.pairs = 0
            threading.Thread(target=self._accept, name="kv-dist-accept", daemon=True).start()

    # ---- producer ----
    def send(self, request_id: str, block_ids: list[int], num_tokens: int) -> tuple[bool, dict]:
        tokens = num_tokens // self.block_size * self.block_size
        params = self.base_params(request_id, tokens)
        params.update(remote_host=self.host, remote_port=self.port, remote_store_port=self.store.port)
        if not tokens:
            return False, params
        with self.lock:
            self.offers[request_id] = (list(block_ids[:tokens // self.block_size]), tokens,
                                       time.monotonic() + self.abort_timeout)
        self.sends_via["torch_distributed"] += 1
        return True, params

    def poll_sent(self) -> list[str]:
        with self.lock:
            done, self.sent = self.sent, []
            return done + self.expire(self.offers, lambda offer: offer[2], self.abort_timeout)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                pair = self.pairs
                self.pairs += 1
            threading.Thread(target=self._serve, args=(conn, pair), name=f"kv-dist-pair{pair}", daemon=True).start()

    def _serve(self, conn: socket.socket, pair: int) -> None:
        """One decode instance: form the pair's group, then answer its reads one after another."""
        try:
            with conn, conn.makefile("rb") as reader:
                hello = _recv_json(reader)
                prefix = f"{self.engine_id}-pair{pair}"
                backend = self._pair_backend(hello.get("device"))
                _send_json(conn, {"pair": prefix, "backend": backend})
                group = _process_group(backend, dist.PrefixStore(prefix, self.store), 0, self.connect_timeout)
                while not self.closed:
                    ask = _recv_json(reader)
                    with self.lock:
                        offer = self.offers.get(ask["request"])
                    if offer is None:
                        _send_json(conn, {"error": "the prefill instance holds no KV for this request (expired?)"})
                        continue
                    blocks, tokens, _ = offer
                    first, count = int(ask["first_token"]), int(ask["num_tokens"])
                    if first + count > tokens:
                        _send_json(conn, {"error": "fewer tokens held than asked for"})
                        continue
                    _send_json(conn, {"ok": True})
                    self._send_tokens(group, backend, blocks, first, count)
                    with self.lock:  # sent: the blocks may go
                        if self.offers.pop(ask["request"], None) is not None:
                            self.sent.append(ask["request"])
        except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
            if not self.closed:
                logger.warning("KV pair %d closed: %s", pair, exc)

    def _pair_backend(self, peer_device: str | None) -> str:
        here = self.platform.device_uuid(self.tensors[0].device) if self.tensors else None
        if self.backend != "gloo" and here is not None and here == peer_device:
            logger.info("KV pair on one device (%s): over gloo through host memory", here)
            return "gloo"
        return self.backend

    def _send_tokens(self, group, backend: str, blocks: list[int], first: int, count: int) -> None:
        bs = self.block_size
        b0, b1 = first // bs, -(-(first + count) // bs)
        ids = self.platform.to_device(np.asarray(blocks[b0:b1], dtype=np.int64), self.tensors[0].device)
        skip = first - b0 * bs
        for t in self.tensors:
            tokens = t.index_select(0, ids).reshape(-1, *t.shape[2:])[skip:skip + count].contiguous()
            if backend == "gloo":  # gloo moves host memory only
                tokens = tokens.cpu()
            group.send([tokens], 1, 0).wait()
        self.platform.synchronize()

    # ---- consumer ----
    def start_load(self, request_id: str, params: dict, block_ids: list[int], first_token: int) -> None:
        count = len(block_ids) * self.block_size
        reason = self.offer_mismatch(params, first_token, count)
        address = (params.get("remote_host"), params.get("remote_port"))
        if reason is None and not (isinstance(address[0], str) and isinstance(address[1], int)):
            reason = "kv_transfer_params carry no address of the prefill instance"
        if reason is not None:
            raise ValueError(reason)
        link = self.links.get(address)
        if link is None or not link.alive:
            link = self.links[address] = _Link(self, address, int(params.get("remote_store_port") or 0))
        future: Future = Future()
        future.deadline = time.monotonic() + self.load_timeout
        future.abandoned = False  # set when given up on: a late answer must not write the blocks
        link.submit((str(params.get("remote_request_id")), first_token, count, list(block_ids), future))
        self.loads[request_id] = future

    def poll_loaded(self) -> list[tuple[str, str | None]]:
        done = []
        now = time.monotonic()
        for request_id, future in list(self.loads.items()):
            if future.done():
                del self.loads[request_id]
                error = None if future.cancelled() else future.exception()
                done.append((request_id, None if error is None else f"{type(error).__name__}: {error}"))
            elif now > future.deadline:
                future.abandoned = True
                del self.loads[request_id]
                done.append((request_id, f"the transfer did not end within {self.load_timeout:.0f} s"))
        return done

    def cancel_load(self, request_id: str) -> bool:
        future = self.loads.get(request_id)
        if future is None or future.cancel():  # not begun: the link skips it
            self.loads.pop(request_id, None)
            return True
        return False

    def close(self) -> None:
        self.closed = True
        for link in self.links.values():
            link.close()
        if self.is_producer:
            self.listener.close()


class _Link:
    """A decode instance's connection to one prefill instance: its own thread runs the loads in order."""

    def __init__(self, owner: TorchDistributedConnector, address: tuple[str, int], store_port: int):
        self.owner = owner
        self.address = address
        self.store_port = store_port
        self.jobs: queue.Queue = queue.Queue()
        self.alive = True
        self.lock = threading.Lock()  # a job is queued only while the thread still takes jobs
        self.sock = None
        threading.Thread(target=self._run, name=f"kv-dist-link-{address[1]}", daemon=True).start()

    def _run(self) -> None:
        o = self.owner
        try:
            self.sock = socket.create_connection(self.address, timeout=o.connect_timeout.total_seconds())
            reader = self.sock.makefile("rb")
            device = o.platform.device_uuid(o.tensors[0].device) if o.tensors else None
            _send_json(self.sock, {"hello": o.engine_id, "device": device})
            answer = _recv_json(reader)
            prefix, backend = answer["pair"], answer.get("backend", o.backend)
            store = dist.TCPStore(self.address[0], self.store_port, None, False, timeout=o.connect_timeout)
            group = _process_group(backend, dist.PrefixStore(prefix, store), 1, o.connect_timeout)
            self.sock.settimeout(None)
        except Exception as exc:  # noqa: BLE001 - every load queued here fails with the reason
            return self._fail_all(exc)
        while self.alive:
            remote_request, first, count, block_ids, future = self.jobs.get()
            if future is None or not future.set_running_or_notify_cancel():
                continue
            try:
                _send_json(self.sock, {"request": remote_request, "first_token": first, "num_tokens": count})
                answer = _recv_json(reader)
                if "error" in answer:
                    raise ValueError(answer["error"])
                ids = o.platform.to_device(np.asarray(block_ids, dtype=np.int64), o.tensors[0].device)
                for t in o.tensors:
                    buf = torch.empty((count, *t.shape[2:]), dtype=t.dtype,
                                      device="cpu" if backend == "gloo" else t.device)
                    group.recv([buf], 0, 0).wait()
                    if not future.abandoned:  # given up on: its blocks may belong to another request now
                        buf = buf.to(t.device)
                        t.index_copy_(0, ids, buf.view(len(block_ids), o.block_size, *t.shape[2:]))
                o.platform.synchronize()
                future.set_result(None)
            except ValueError as exc:
                future.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - the link is broken: this and every later load fail
                future.set_exception(exc)
                return self._fail_all(exc)

    def submit(self, job: tuple) -> None:
        with self.lock:
            if self.alive:
                return self.jobs.put(job)
        if job[-1].set_running_or_notify_cancel():
            job[-1].set_exception(ConnectionError("the link to the prefill instance is closed"))

    def _fail_all(self, exc: BaseException) -> None:
        with self.lock:
            self.alive = False
        while True:
            try:
                *_, future = self.jobs.get_nowait()
            except queue.Empty:
                break
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(ConnectionError(f"no link to the prefill instance: {exc}"))

    def close(self) -> None:
        with self.lock:
            self.alive = False
        self.jobs.put((None, 0, 0, [], None))
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
