"""How the Triton backend cuts a step's attention, and that the result stays the reference's: a mixed
step (decodes beside prefill chunks) sends its decodes, which the runner puts first, to the decode
kernel and the rest to a prefill kernel; a large decode batch may be split in splits of a least size."""
import types

import numpy as np
import torch

from sageinfer import LLM, SamplingParams
from sageinfer.attention.backend import LayerKVCache
from sageinfer.attention import triton_backend
from sageinfer.attention.torch_ref import paged_attention_ref
from sageinfer.attention.triton_backend import TritonBackend
from sageinfer.executor.model_runner import single_token_first
from sageinfer.layers.rotary import RotaryEmbedding
from sageinfer.ops import prefill_attention as tile_prefill
from sageinfer.ops.paged_attention import LONG_CONTEXT
from kernels_util import DEVICE, TOL, random_paged_batch, rel_err
from oracle import assert_greedy_matches_hf


def _step(query_lens, context_lens, page=64, heads=4, kv_heads=2, head_dim=16, seed=0):
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, kv_heads, head_dim, page, torch.float32,
                                                seed=seed)
    layer = types.SimpleNamespace(q_norm=None, k_norm=None, scale=head_dim ** -0.5,
                                  rotary_emb=RotaryEmbedding(head_dim, 2 * LONG_CONTEXT, 10000.0, None).to(DEVICE))
    tokens = sum(query_lens)
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(tokens, n, head_dim, generator=gen).to(DEVICE) for n in (heads, kv_heads, kv_heads))
    positions = torch.cat([torch.arange(c, c + n) for n, c in zip(query_lens, context_lens)]).to(DEVICE)
    return layer, positions, q, k, v, LayerKVCache(k_cache, v_cache), meta


def _recording(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def record(*a, **k):
        calls.append((name, a[8], a[7]))  # max_query_len, num_seqs
        return original(*a, **k)
    monkeypatch.setattr(module, name, record)


def test_a_mixed_step_sends_its_decodes_to_the_decode_kernel(monkeypatch):
    calls = []
    _recording(monkeypatch, triton_backend, "paged_attention", calls)
    _recording(monkeypatch, tile_prefill, "prefill_attention", calls)
    # Three decodes (one past a page edge), then a prompt, a chunk after cached context, a short one.
    layer, positions, q, k, v, cache, meta = _step([1, 1, 1, 70, 9, 3], [63, 200, 5, 0, 130, 17])
    backend = TritonBackend(num_sms=8)
    backend.plan(meta, num_kv_heads=2)
    out = backend.forward(layer, positions, q, k, v, cache, meta)
    assert calls == [("paged_attention", 1, 3), ("prefill_attention", 70, 3)]
    ref = paged_attention_ref(q, cache, meta, layer.scale)  # q was rotated in place by the forward
    assert rel_err(out, ref) < TOL[torch.float32]


def test_steps_that_are_not_mixed_are_not_split():
    for query_lens in ([1, 1, 1], [5, 7], [4, 1, 1]):  # decodes only, prefills only, decodes not leading
        *_, meta = _step(query_lens, [10, 20, 30][:len(query_lens)])
        TritonBackend(num_sms=8).plan(meta, num_kv_heads=2)
        assert meta.parts is None


def _one_sequence_plans(lengths):
    from sageinfer.attention.backend import AttentionMetadata
    plans = {}
    for keys in lengths:
        meta = AttentionMetadata(0, None, None, None, None, max_query_len=1, max_seq_len=keys,
                                 query_start_loc_cpu=[], seq_lens_cpu=[keys])
        TritonBackend(num_sms=132).plan(meta, num_kv_heads=8)
        plans[keys] = (meta.num_splits, meta.min_split_keys)
    return plans


def test_one_long_sequence_takes_more_splits():
    """A decode of one sequence (8 KV heads, 132 SMs) takes 32 splits below 32K keys and 64 from there,
    each of at least one key tile: planned for 32K or more (a graph plans for max_model_len), a short
    sequence is still cut in as many splits as it has tiles, up to 64."""
    assert _one_sequence_plans((4096, 16384, 32768, 131072)) == {
        4096: (16, 0), 16384: (32, 0), 32768: (64, 64), 131072: (64, 64)}


def test_long_decode_threshold_and_split_floor_can_be_moved(monkeypatch):
    """SAGEINFER_LONG_DECODE_KEYS / _MIN_KEYS (read at import; set here on the modules)."""
    from sageinfer.ops import paged_attention
    monkeypatch.setattr(paged_attention, "LONG_DECODE_KEYS", 65536)
    monkeypatch.setattr(triton_backend, "LONG_DECODE_KEYS", 65536)
    monkeypatch.setattr(triton_backend, "LONG_DECODE_MIN_KEYS", 1024)
    assert _one_sequence_plans((32768, 65536)) == {32768: (32, 0), 65536: (64, 1024)}


def test_split_parts_are_batches_of_their_own():
    *_, meta = _step([1, 1, 70, 9], [63, 5, 0, 130])
    decodes, rest = meta.split_at(2)
    assert (decodes.num_seqs, decodes.max_query_len, decodes.max_seq_len, decodes.num_actual_tokens) == (2, 1, 64, 2)
    assert (rest.num_seqs, rest.max_query_len, rest.max_seq_len, rest.num_actual_tokens) == (2, 70, 139, 79)
    assert rest.query_start_loc.tolist() == rest.query_start_loc_cpu == [0, 70, 79]
    assert torch.equal(rest.block_table, meta.block_table[2:]) and rest.seq_lens.tolist() == [70, 139]


class _PlatformPrefill:
    """A platform long-prompt kernel computed by the portable one; records the batches it is given."""

    def __init__(self):
        self.num_seqs = []

    def supports(self, *args):
        return True

    def __call__(self, q, k_cache, v_cache, out, block_table, seq_lens, query_start_loc, num_seqs, max_query_len,
                 scale):
        self.num_seqs.append(num_seqs)
        return tile_prefill.prefill_attention(q, k_cache, v_cache, out, block_table, seq_lens, query_start_loc,
                                              num_seqs, max_query_len, scale)


def test_the_platform_long_prompt_kernel_gets_only_the_prefills():
    layer, positions, q, k, v, cache, meta = _step([1, 1, 40, 8], [30, LONG_CONTEXT, 25, 3])
    platform = _PlatformPrefill()
    backend = TritonBackend(num_sms=8, platform_prefill=platform)
    backend.plan(meta, num_kv_heads=2)
    meta.parts[1].max_seq_len = LONG_CONTEXT  # as if a prompt were long: the kernel's threshold
    out = backend.forward(layer, positions, q, k, v, cache, meta)
    assert platform.num_seqs == [2]
    assert rel_err(out, paged_attention_ref(q, cache, meta, layer.scale)) < TOL[torch.float32]


def test_the_runner_puts_single_token_sequences_first_in_order():
    a, b, c, d, e = "abcde"
    assert single_token_first([(a, 5), (b, 1), (c, 9), (d, 1), (e, 1)]) == [(b, 1), (d, 1), (e, 1), (a, 5), (c, 9)]
    same = [(a, 1), (b, 1)]
    assert single_token_first(same) is same


def test_mixed_steps_generate_what_transformers_does(model_dirs, monkeypatch):
    """Chunks of a long prompt beside the decodes of short ones, whose rows the runner moves first."""
    splits = []
    plan = TritonBackend.plan

    def counting_plan(self, meta, num_kv_heads):
        plan(self, meta, num_kv_heads)
        splits.append(meta.parts is not None)
    monkeypatch.setattr(TritonBackend, "plan", counting_plan)
    rng = np.random.default_rng(21)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (90, 4, 11, 6)]
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=64,
              max_model_len=256, max_num_batched_tokens=24, show_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert any(splits), "no step was a mixed one"
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dirs["qwen3"], prompt, out.outputs[0].token_ids)


def test_ragged_decode_splits_generate_what_transformers_does(model_dirs, monkeypatch):
    """Decode batches split in splits of a least size (SAGEINFER_RAGGED_DECODE_SPLITS): short and long
    sequences side by side, greedy output as transformers'."""
    monkeypatch.setattr(triton_backend, "RAGGED_DECODE_SPLITS", 4)
    monkeypatch.setattr(triton_backend, "RAGGED_MIN_KEYS", 32)
    ragged = []
    plan = TritonBackend.plan

    def recording_plan(self, meta, num_kv_heads):
        self.num_sms = 1  # every decode batch fills this "GPU": no split-KV by occupancy
        plan(self, meta, num_kv_heads)
        ragged.append(meta.min_split_keys == 32 and meta.num_splits == 4)
    monkeypatch.setattr(TritonBackend, "plan", recording_plan)
    rng = np.random.default_rng(22)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (150, 5, 40, 9)]
    llm = LLM(model_dirs["llama"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=64,
              max_model_len=256, show_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert any(ragged), "no decode batch was split"
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dirs["llama"], prompt, out.outputs[0].token_ids)
