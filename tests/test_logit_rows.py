"""The LM head runs only at the row counts the start-up ran it at (ModelRunner.logit_row_counts): a library
matmul at a row count new to it may load a kernel, and on CUDA that waits for the device to drain."""
import numpy as np
import torch

from sageinfer import LLM, SamplingParams
from sageinfer.layers.sampler import Sampler


def _workload():
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": rng.integers(3, 400, size=int(n)).tolist()} for n in rng.integers(2, 90, size=37)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True, logprobs=2)
              for m in rng.integers(1, 12, size=37)]
    return prompts, params


def _outputs(outs):
    """Each request's tokens, and its top logprobs as (token, value) pairs."""
    return [(o.outputs[0].token_ids, [[(t, lp.logprob) for t, lp in sorted(e.items())] for e in o.outputs[0].logprobs])
            for o in outs]


def _engine(model_dir):
    return LLM(model_dir, dtype="float32", num_gpu_blocks_override=256, max_num_seqs=40, max_num_batched_tokens=256,
               show_progress=False)


def test_the_lm_head_runs_at_the_warmed_row_counts_only(llama_dir):
    llm = _engine(llama_dir)
    runner = llm.engine.runner
    assert runner.logit_row_counts == [1, 2, 4, 8, 16, 32, 48]  # the graphs' ladder, past max_num_seqs
    counts = []
    compute = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: counts.append(hidden.shape[0]) or compute(hidden)
    runner.warm_up_logits()
    assert counts == runner.logit_row_counts
    counts.clear()
    padded = _outputs(llm.generate(*_workload(), use_tqdm=False))
    assert set(counts) <= set(runner.logit_row_counts) and len(set(counts)) > 3

    # The same run with every row count its own (nothing padded) samples the same tokens and logprobs (up to
    # the rounding of a matmul over another number of rows).
    plain = _engine(llama_dir)
    plain.engine.runner.logit_row_counts = list(range(1, 41))
    unpadded = _outputs(plain.generate(*_workload(), use_tqdm=False))
    assert [tokens for tokens, _ in unpadded] == [tokens for tokens, _ in padded]
    for (_, a), (_, b) in zip(unpadded, padded):
        assert [[t for t, _ in step] for step in a] == [[t for t, _ in step] for step in b]
        np.testing.assert_allclose([[v for _, v in step] for step in a], [[v for _, v in step] for step in b],
                                   rtol=0, atol=1e-5)


def test_a_decode_graphs_padding_rows_fill_the_count_and_other_steps_repeat_their_last_row(llama_dir):
    runner = _engine(llama_dir).engine.runner
    # a graph of 48: 37 rows, then padding
    graph_out = torch.arange(48 * 3, dtype=torch.float32, device=runner.device).reshape(48, 3)
    rows = runner._logit_rows(graph_out[:48], list(range(37)))
    assert rows.shape == (48, 3) and rows.data_ptr() == graph_out.data_ptr()  # the graph's own rows, no gather
    eager = graph_out[:37]  # an eager decode step's 37 rows: gathered, the last repeated up to 48
    assert torch.equal(runner._logit_rows(eager, list(range(37))), torch.cat([eager, eager[36:].expand(11, 3)]))
    mixed = runner._logit_rows(graph_out, [4, 9, 30])  # a mixed step samples some rows: 3 to 4
    assert torch.equal(mixed, graph_out[torch.tensor([4, 9, 30, 30], device=runner.device)])
    assert runner._logit_rows(graph_out[:32], list(range(32))).shape[0] == 32  # already a count: as it is


def test_the_memory_profile_holds_the_lm_heads_largest_count_before_the_cache_is_sized(llama_dir, monkeypatch):
    """The profiled step samples one row a sequence; a full decode batch's logits (and the start-up's warm-up of
    them) must fit beside the KV cache too, so the profile runs the LM head at its largest count, and the
    sampler over a full batch with its costliest options."""
    from sageinfer.executor.model_runner import ModelRunner
    from sageinfer.models.llama import LlamaForCausalLM
    from sageinfer.platforms.cpu import CpuPlatform
    monkeypatch.setattr(CpuPlatform, "default_kv_cache_bytes", lambda self: None)  # profile, as GPUs do
    monkeypatch.setattr(CpuPlatform, "mem_get_info", lambda self: (1 << 30, 1 << 30))
    events = []
    compute, allocate = LlamaForCausalLM.compute_logits, ModelRunner.allocate_kv_cache
    monkeypatch.setattr(LlamaForCausalLM, "compute_logits",
                        lambda self, hidden: events.append(("logits", hidden.shape[0])) or compute(self, hidden))
    monkeypatch.setattr(ModelRunner, "allocate_kv_cache",
                        lambda self, n: events.append(("cache", n)) or allocate(self, n))
    sample = Sampler.__call__

    def sampler(self, logits, b):
        costly = (not b.all_greedy and b.needs_filter and b.presence_penalty is not None
                  and b.allowed_mask is not None and b.grammar_bitmask is not None
                  # the whole vocabulary in order: sorted, or as a top-k of all of it (a vocabulary under 1,024)
                  and b.needs_sort and b.top_k_draw() in (0, logits.shape[-1]))
        events.append(("sample", logits.shape[0], costly, b.max_num_logprobs))
        return sample(self, logits, b)
    monkeypatch.setattr(Sampler, "__call__", sampler)
    llm = LLM(llama_dir, max_model_len=256, max_num_seqs=40, max_num_batched_tokens=256, gpu_memory_utilization=0.5,
              max_logprobs=7, show_progress=False)
    sized = max(i for i, e in enumerate(events) if e[0] == "cache")  # the cache the profile sized (then the warm-up)
    assert ("logits", 48) in events[:sized] and ("logits", 48) in events[sized:]
    # ... and the sampler over a full batch (max_num_seqs rows) with every option that takes memory
    assert ("sample", 40, True, 7) in events[:sized]
    assert llm.engine.runner.penalties.num_slots == 0  # its penalty slots given back once measured
