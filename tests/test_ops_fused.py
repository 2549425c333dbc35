"""Fused Triton kernels against their torch references (interpreter on CPU)."""
import pytest
import torch
import torch.nn.functional as F

from sageinfer.attention.backend import LayerKVCache
from sageinfer.attention.torch_ref import write_kv_cache_ref
from sageinfer.layers.norm import rms_norm_ref
from sageinfer.layers.rotary import RotaryEmbedding
from sageinfer.ops.activation import silu_and_mul
from sageinfer.ops.rms_norm import rms_norm
from sageinfer.ops.rope_cache import rope_and_cache
from kernels_util import DEVICE, TOL, rel_err

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 16), (7, 96), (13, 130)])
def test_rms_norm_with_and_without_residual(rows, hidden, dtype):
    x, res, w = (t.to(dtype).to(DEVICE) for t in (torch.randn(rows, hidden), torch.randn(rows, hidden), torch.rand(hidden)))
    assert rel_err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) < TOL[dtype]
    out, new_res = rms_norm(x, w, 1e-6, res)
    assert torch.equal(new_res, x + res)
    assert rel_err(out, rms_norm_ref(x + res, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, d", [(1, 8), (5, 100), (3, 1500)])
def test_silu_and_mul(rows, d, dtype):
    x = torch.randn(rows, 2 * d).to(dtype).to(DEVICE)
    ref = F.silu(x[:, :d].float()) * x[:, d:].float()
    assert rel_err(silu_and_mul(x), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (3, 1, 24)])
def test_rope_and_cache_write(heads, kv_heads, head_dim, qk_norm, dtype):
    tokens, page, blocks = 9, 4, 6
    rotary = RotaryEmbedding(head_dim, 256, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    rotary = rotary.to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype).to(DEVICE)
    q, k, v = [t.view(tokens, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                 kv_heads * head_dim], dim=-1)]
    positions = torch.randint(0, 256, (tokens,)).to(DEVICE)
    slots = torch.randperm(blocks * page)[:tokens]
    slots[3] = -1  # a padding token: not written
    slots = slots.to(DEVICE)
    qw, kw = (torch.rand(head_dim).to(dtype).to(DEVICE), torch.rand(head_dim).to(dtype).to(DEVICE)) if qk_norm else (None, None)
    qr, kr = (rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-6)) if qk_norm else (q.clone(), k.clone())
    q_ref, k_ref = rotary(positions, qr, kr)
    kc_ref = torch.zeros(blocks, page, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    vc_ref = torch.zeros_like(kc_ref)
    write_kv_cache_ref(k_ref, v, LayerKVCache(kc_ref, vc_ref), slots)
    kc, vc = torch.zeros_like(kc_ref), torch.zeros_like(vc_ref)
    out = rope_and_cache(positions, q, k, v, rotary.cos_sin_cache, kc, vc, slots, qw, kw, 1e-6)
    assert rel_err(out, q_ref) < TOL[dtype]
    assert rel_err(kc, kc_ref) < TOL[dtype] and torch.equal(vc, vc_ref)
