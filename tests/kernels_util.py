"""Shared helpers for kernel tests: random paged batches and tolerances per dtype."""
from __future__ import annotations

import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from sageinfer.attention.backend import AttentionMetadata

# Kernels run compiled on a GPU when there is one, else in the Triton interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# On the GPU, Triton computes float32 dots in tf32 (about 3e-4 relative error).
TOL = {torch.float32: 2e-4 if DEVICE == "cpu" else 2e-3, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def random_paged_batch(query_lens, context_lens, num_kv_heads, head_dim, page_size, dtype, device=DEVICE, seed=0):
    """Caches filled with random values; each sequence owns a random, non-contiguous set of blocks."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    blocks_per_seq = [-(-s // page_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 3
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(blocks_per_seq)
    block_table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_table[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(
        num_actual_tokens=qsl[-1], slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_table=block_table.to(device), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return k_cache.to(device), v_cache.to(device), meta


def poison_unwritten_slots(k_cache, v_cache, meta):
    """NaN in every cache row no sequence owns, so a read past a sequence's end shows up."""
    owned = torch.zeros(k_cache.shape[0], k_cache.shape[1], dtype=torch.bool)
    page = k_cache.shape[1]
    for seq, length in enumerate(meta.seq_lens_cpu):
        for pos in range(length):
            owned[meta.block_table[seq, pos // page].item(), pos % page] = True
    owned = owned.to(k_cache.device)
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")


def launch_key(kernel, args, kwargs) -> tuple:
    """What a Triton launch compiles by: its constexprs and launch options, and the specialisation of
    every other argument (as Triton's JIT computes it, with the kernel's do_not_specialize); tensors
    passed by name (split-K's planes) by their specialisation too, other named values as they are."""
    names = kernel.arg_names
    unspecialised = getattr(kernel, "do_not_specialize", None)
    if unspecialised is None:  # the interpreter's function keeps its decorator's arguments
        unspecialised = kernel.kwargs.get("do_not_specialize") or []
    unspecialised = set(unspecialised)
    values = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
    spec = tuple((n, native_specialize_impl(BaseBackend, v, False, n not in unspecialised, True))
                 for n, v in values.items())
    options = tuple(sorted((k, str(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
    return kernel.fn.__name__, options, spec


def decode_step_before_rotary(meta, context_lens, heads, kv_heads, head_dim, page, dtype, gen, qk_norm):
    """A decode step's q, k, v ([T, H, D] views of one qkv row each) before rotary, and what
    ops.paged_attention's rope= takes with them: (positions, k, v, cos_sin_cache, slots, q_norm, k_norm,
    eps). Each sequence's new token goes to the slot after its context in meta's block table; the last
    row is a graph's padding (slot -1, nothing written)."""
    from sageinfer.layers.rotary import RotaryEmbedding
    num = len(context_lens)
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None).to(DEVICE)
    qkv = torch.randn(num, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = [t.view(num, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                             kv_heads * head_dim], dim=-1)]
    table = meta.block_table.cpu()
    slots = torch.tensor([int(table[i, c // page]) * page + c % page for i, c in enumerate(context_lens)])
    slots[-1] = -1
    norms = [(1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE) for _ in range(2)]
    q_norm, k_norm = norms if qk_norm else (None, None)
    positions = torch.tensor(context_lens, device=DEVICE)
    return q, k, v, (positions, k, v, rotary.cos_sin_cache, slots.to(DEVICE), q_norm, k_norm, 1e-6)
