"""KV transfer bandwidth of the PD connectors: a 32K-token prompt's KV on Qwen3-8B shapes (36 layers,
8 KV heads of 128, bf16, 4.8 GB) offered by a producer cache and loaded into a consumer cache on
the same device, timed end to end (what a request waits), and checked byte for byte. The producer
runs in a process of its own, as a prefill instance does.

  python benchmarks/pd_transfer_bandwidth.py [--tokens 32768] [--connector SharedMemoryConnector]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time

import torch

from sageinfer.attention.backend import LayerKVCache
from sageinfer.platforms import get_platform
from sageinfer.transport.kv_transfer_config import build_connector, parse_kv_transfer_config


def caches(platform, device, layers, blocks, block_size, heads, dim, fill):
    out = []
    for i in range(layers):
        shape = (blocks, block_size, heads, dim)
        k = torch.randn(shape, device=device, dtype=torch.bfloat16) if fill else torch.zeros(shape, device=device, dtype=torch.bfloat16)
        v = torch.randn(shape, device=device, dtype=torch.bfloat16) if fill else torch.zeros(shape, device=device, dtype=torch.bfloat16)
        out.append(LayerKVCache(k, v))
    return out


def _producer(args, extra, pipe) -> None:
    """The prefill side in a process of its own (as deployed): offers the prompt on request."""
    platform = get_platform()
    nb = args.tokens // args.block_size
    torch.manual_seed(0)
    src = caches(platform, platform.device(0), args.layers, nb + 1, args.block_size, args.kv_heads, args.head_dim, True)
    producer = build_connector(parse_kv_transfer_config({"kv_connector": args.connector, "kv_role": "kv_producer",
                                                        "engine_id": "bench", "kv_connector_extra_config": extra}),
                               src, args.block_size, platform)
    platform.synchronize()
    pipe.send("ready")
    while (message := pipe.recv()) is not None:
        kind, request_id = message
        if kind == "early":  # the prompt's chunks before its last, staged layer by layer as the model would
            for k in range(1, args.early_chunks):
                after_layer = producer.stage_step([(request_id, list(range(1, nb + 1)),
                                                    k * args.tokens // args.early_chunks, args.tokens + 1)])
                for layer in range(args.layers):
                    after_layer(layer)
            producer.early[request_id].wait()
            pipe.send("staged")
        elif kind == "send":
            pipe.send(producer.send(request_id, list(range(1, nb + 1)), args.tokens))
        else:  # wait until the consumer's read lets the blocks go
            while request_id not in producer.poll_sent():
                time.sleep(0.0005)
            pipe.send("freed")
    producer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--connector", default="SharedMemoryConnector")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--staging-gb", type=float, default=None,
                   help="SharedMemoryConnector's staging region (0: a file per prompt; default: the connector's)")
    p.add_argument("--early-chunks", type=int, default=1,
                   help="the prompt computed in this many chunks, the KV of all but the last staged layer by layer "
                        "before the clock starts (as when the later chunks' compute outlasts their copies), the "
                        "last chunk's at send(): what is timed is then the most a request still waits after its "
                        "prefill (SharedMemoryConnector's region; in the engine the last chunk's layers leave "
                        "while it computes too)")
    p.add_argument("--result-file", default=None)
    args = p.parse_args()
    platform = get_platform()
    device = platform.device(0)
    nb = args.tokens // args.block_size
    nbytes = 2 * args.layers * args.tokens * args.kv_heads * args.head_dim * 2
    extra = {}
    if args.connector == "SharedMemoryConnector":
        free_shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        extra["shm_dir"] = "/dev/shm" if free_shm > 1.2 * nbytes else "/tmp"
        if args.staging_gb is not None:
            extra["staging_gb"] = args.staging_gb
    pipe, child_end = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_producer, args=(args, extra, child_end), daemon=True)
    child.start()
    assert pipe.recv() == "ready"
    dst = caches(platform, device, args.layers, nb + 1, args.block_size, args.kv_heads, args.head_dim, False)
    consumer = build_connector(parse_kv_transfer_config({"kv_connector": args.connector, "kv_role": "kv_consumer",
                                                        "kv_connector_extra_config": extra}),
                               dst, args.block_size, platform)
    if args.connector == "SharedMemoryConnector":  # a decode instance up for a while has mapped the region
        deadline = time.monotonic() + 30
        while not consumer.mapped and time.monotonic() < deadline:
            time.sleep(0.01)
    blocks = list(range(1, nb + 1))
    rows = []
    for r in range(args.repeats):
        if args.early_chunks > 1:
            pipe.send(("early", f"r{r}"))
            assert pipe.recv() == "staged"
        platform.synchronize()
        t0 = time.perf_counter()
        pipe.send(("send", f"r{r}"))
        held, params = pipe.recv()
        t1 = time.perf_counter()  # the offer itself (a background copy may go on)
        consumer.start_load(f"r{r}", params, blocks, 0)
        while True:
            done = consumer.poll_loaded()
            if done:
                break
            time.sleep(0.0005)
        platform.synchronize()
        t2 = time.perf_counter()
        assert done[0][1] is None, done
        if held:
            pipe.send(("freed", f"r{r}"))
            pipe.recv()
        rows.append({"send_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0})
        print(f"repeat {r}: offer {t1 - t0:.4f} s, load {t2 - t1:.4f} s, total {t2 - t0:.4f} s "
              f"= {nbytes / (t2 - t0) / 1e9:.2f} GB/s", flush=True)
    pipe.send(None)
    child.join(timeout=60)
    torch.manual_seed(0)  # the producer's contents, made again here the same way
    src = caches(platform, device, args.layers, nb + 1, args.block_size, args.kv_heads, args.head_dim, True)
    same = all(torch.equal(a.k[1:nb + 1], b.k[1:nb + 1]) and torch.equal(a.v[1:nb + 1], b.v[1:nb + 1])
               for a, b in zip(src, dst))
    best = min(rows, key=lambda x: x["total_s"])
    result = {"connector": args.connector, "tokens": args.tokens, "bytes": nbytes, "staging_dir": extra.get("shm_dir"),
              "staging_gb": extra.get("staging_gb", "default"), "early_chunks": args.early_chunks,
              "device": platform.device_name(), "producer": "a process of its own",
              "best": best, "GBps_end_to_end": nbytes / best["total_s"] / 1e9, "identical": same, "repeats": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "repeats"}), flush=True)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
