"""Tensor-parallel ranks for the tests: one process per rank on gloo, each running the same engine.

Each rank's scheduler sees the same requests in the same order and so makes the same decisions,
which keeps the ranks' collectives in step. This drives the sharded model from tests; it is not the
production executor (one scheduler whose step messages go to workers).
"""
from __future__ import annotations

import json
import os

import torch
import torch.multiprocessing as mp


def _rank_main(rank: int, size: int, init_file: str, runs: list, result_file: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sageinfer import LLM, SamplingParams
    from sageinfer.distributed.parallel_state import init_tensor_parallel
    init_tensor_parallel(rank, size, "gloo", f"file://{init_file}")
    results = []
    for model_dir, prompts, max_tokens, options in runs:
        llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False, **options)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        attn = llm.engine.runner.model.model.layers[0].self_attn
        shapes = {"qkv_rows": attn.qkv_proj.weight.shape[0], "o_cols": attn.o_proj.weight.shape[1],
                  "kv_cache_heads": llm.engine.runner.kv_caches[0].k.shape[2]}
        results.append({"tokens": [o.outputs[0].token_ids for o in outs], "shapes": shapes})
    with open(f"{result_file}.{rank}", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def generate_tensor_parallel(size: int, runs: list, workdir: str) -> list:
    """Per run (model_dir, prompts, max_tokens, LLM options) at tp=size: {"tokens": greedy token ids,
    "shapes": rank 0's layer-0 shard shapes}; every rank's tokens must agree."""
    init_file, result_file = os.path.join(workdir, "tp_init"), os.path.join(workdir, "tp_result")
    mp.spawn(_rank_main, args=(size, init_file, runs, result_file), nprocs=size, join=True)
    answers = []
    for rank in range(size):
        with open(f"{result_file}.{rank}") as f:
            answers.append(json.load(f))
    assert all([r["tokens"] for r in a] == [r["tokens"] for r in answers[0]] for a in answers), "ranks disagree"
    return answers[0]
