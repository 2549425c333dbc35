"""On a machine of several GPUs: how fast the cards reduce between them, and whether tensor
parallelism generates what one GPU does.

  python benchmarks/gpu_tp_check.py --tp 2 --out tp_check.json

1. All-reduce between the cards (one process per GPU, NCCL): latency and bus bandwidth from decode
   sizes (8 KB: one token of a 4096-wide model in bf16) to 1 GiB, eager and captured in a CUDA
   graph (as the decode graphs hold them), beside PyTorch's symmetric-memory one-shot all-reduce.
2. Tiny random models: tp=N against tp=1 and transformers, fp32 (decode graphs on).
3. Qwen3-8B shapes, dummy weights (the same model at every tp size): greedy tokens at tp=N against
   tp=1, each in its own process; the agreement rate, since bf16 sums in another order differ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 16 << 20, 128 << 20, 1 << 30]
GRAPH_SIZES = [8 << 10, 64 << 10, 512 << 10]


def _time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _collectives(rank: int, size: int, init: str, out: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=size)
    rows = _Rows(rank)
    for nbytes in SIZES:
        n = nbytes // 2
        x = torch.full((n,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
        iters = 200 if nbytes <= (2 << 20) else 20
        ms = _time_ms(lambda: dist.all_reduce(x), iters)
        rows.append({"kind": "nccl eager", "bytes": nbytes, "us": ms * 1e3,
                     "bus_gbs": 2 * (size - 1) / size * nbytes / (ms * 1e-3) / 1e9})
    expected = size * (size + 1) / 2
    for nbytes in GRAPH_SIZES:
        n = nbytes // 2
        src = torch.full((n,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
        bufs = [torch.empty_like(src) for _ in range(32)]

        def body():
            for b in bufs:
                b.copy_(src)
                dist.all_reduce(b)
        body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        ok = True
        try:
            with torch.cuda.graph(graph):
                body()
            for b in bufs:
                b.zero_()
            graph.replay()
            torch.cuda.synchronize()
            ok = all(bool((b == expected).all()) for b in bufs)
            ms = _time_ms(graph.replay, 20) / len(bufs)
            rows.append({"kind": "nccl in graph", "bytes": nbytes, "us": ms * 1e3, "correct": ok})
        except Exception as exc:  # noqa: BLE001  (recorded: whether NCCL captures is the question)
            rows.append({"kind": "nccl in graph", "bytes": nbytes, "error": f"{type(exc).__name__}: {exc}"[:300]})
        del graph  # a graph holding collectives keeps the communicator from being destroyed
    try:
        import torch.distributed._symmetric_memory as symm_mem
        name = dist.group.WORLD.group_name
        for nbytes in GRAPH_SIZES:
            buf = symm_mem.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            symm_mem.rendezvous(buf, name)
            buf.fill_(rank + 1)
            y = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
            torch.cuda.synchronize()
            ok = bool((y == expected).all())
            ms = _time_ms(lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name), 200)
            rows.append({"kind": "symm_mem one-shot", "bytes": nbytes, "us": ms * 1e3, "correct": ok})
    except Exception as exc:  # noqa: BLE001
        rows.append({"kind": "symm_mem one-shot", "error": f"{type(exc).__name__}: {exc}"[:300]})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


class _Rows(list):
    """Rows printed as they come (rank 0), so a hang still shows how far it got."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def append(self, row) -> None:
        super().append(row)
        if self.rank == 0:
            print(row, flush=True)


def collectives(tp: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(_collectives, args=(tp, f"file://{d}/rdv", out), nprocs=tp, join=True)
        with open(out) as f:
            return json.load(f)


def tiny_models(tp: int) -> list[dict]:
    import numpy as np

    from oracle import assert_greedy_matches_hf
    from sageinfer import LLM, SamplingParams
    from sageinfer.models.tiny import build_tiny_model
    rows = []
    root = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (1, 9, 40, 130, 300, 17, 5, 64)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for arch in ("llama", "qwen3", "qwen2"):
        path = build_tiny_model(os.path.join(root, arch), arch, hidden_size=128, num_heads=4, num_kv_heads=2)
        tokens = {}
        for size in (1, tp):
            llm = LLM(path, dtype="float32", num_gpu_blocks_override=256, max_num_batched_tokens=64,
                      tensor_parallel_size=size, show_progress=False)
            assert llm.engine.runner.graphs is not None
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            tokens[size] = [o.outputs[0].token_ids for o in outs]
            llm.engine.shutdown()
            del llm
        hf_ok = 0
        for p, t in zip(prompts, tokens[tp]):
            try:
                assert_greedy_matches_hf(path, p, t)
                hf_ok += 1
            except AssertionError:
                pass
        rows.append({"arch": arch, "tp": tp, "same_as_tp1": tokens[tp] == tokens[1],
                     "matches_transformers": f"{hf_ok}/{len(prompts)}"})
        print(rows[-1], flush=True)
    return rows


def _greedy_tokens(model: str, tp: int, out: str) -> None:
    """A subprocess: greedy tokens of 32 prompts at this tp size."""
    import numpy as np

    from sageinfer import LLM, SamplingParams
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(3, 150000, size=int(n)).tolist()}
               for n in rng.integers(16, 1500, size=32)]
    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=tp, max_model_len=4096,
              max_num_seqs=64, show_progress=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump({"tokens": [o.outputs[0].token_ids for o in outs], "seconds": seconds}, f)
    llm.engine.shutdown()


def agreement(model: str, tp: int) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for size in (1, tp):
            out = os.path.join(d, f"tp{size}.json")
            code = (f"import sys; sys.path.insert(0, {os.path.join(HERE, '..')!r}); "
                    f"sys.path.insert(0, {HERE!r}); import gpu_tp_check as g; "
                    f"g._greedy_tokens({model!r}, {size}, {out!r})")
            subprocess.run([sys.executable, "-c", code], check=True)
            with open(out) as f:
                runs[size] = json.load(f)
    a, b = runs[1]["tokens"], runs[tp]["tokens"]
    same_tokens = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    first_split = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
    return {"model": os.path.basename(model), "tp": tp, "sequences": len(a), "tokens_each": len(a[0]),
            "identical_sequences": sum(s == t for s, t in zip(a, b)),
            "token_agreement": same_tokens / sum(len(s) for s in a),
            "mean_tokens_before_first_difference": sum(first_split) / len(first_split),
            "first_tokens_equal": sum(s[0] == t[0] for s, t in zip(a, b)),
            "generate_seconds": {str(k): v["seconds"] for k, v in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model", default=os.path.join(HERE, "..", "sageinfer", "bench", "standard", "qwen3-8b"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="collectives,tiny,agreement")
    args = parser.parse_args()
    assert torch.cuda.device_count() >= args.tp, f"{torch.cuda.device_count()} GPUs visible"
    result = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "tp": args.tp,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    parts = args.parts.split(",")
    if "collectives" in parts:
        result["collectives"] = collectives(args.tp)
    if "tiny" in parts:
        result["tiny_models"] = tiny_models(args.tp)
    if "agreement" in parts:
        result["agreement"] = agreement(args.model, args.tp)
        print(result["agreement"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
