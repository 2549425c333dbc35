"""Prefill attention for NVIDIA Hopper (sm_90), written in Gluon (Triton's explicit-layout language)
with warp specialisation: one copy warp and two consumer warpgroups, each owning 64 of the program's
128 query rows and sharing the key/value tiles.

    copy warp:     block table -> bulk tensor copies of K(j), V(j) into a ring of stages
    warpgroup w:   S(j) = Q_w K(j)^T and O_w += P(j-1) V(j-1) issued together (async),
                   softmax of S(j) while they run, then O_w *= alpha(j)

With PINGPONG the two warpgroups take turns at issuing their matrix products (each waits for the
other's issue through an mbarrier), so the tensor cores run one warpgroup's products while the other
computes its exponentials. The portable kernel (ops.prefill_attention) cannot express either split:
its warps share one instruction stream. H100, 16K chunks of a 32K prompt: 613-654 TFLOP/s against
460-487 (benchmarks/experiments/probe_hopper_attention.py).

Same contract as ops.prefill_attention: q, out [T, Hq, D]; caches [blocks, page, Hkv, D] in bf16 or
fp16, head dim 128, pages of 64 keys or more. Cache rows past a sequence's end were never written and
may hold NaN: their scores are masked to -inf, and a value tile that runs past the end is copied by
the copy warp through registers with those rows written as zeros (0 * NaN would poison O).
"""
import logging

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

LOG2E = 1.4426950408889634
WG_ROWS = gl.constexpr(64)  # query rows per consumer warpgroup (one m64 wgmma)
# 128-key tiles in two stages: 164 KB of shared memory. Measured on the L2 chunks and no better within
# the 1-4% spread between machines: three stages (230 KB), heavy query tiles launched first, turns not
# enforced (2026-11-24-h100-hopper-ws-attention-v2.json); 64-key tiles were slower (545-576 TFLOP/s).
CONFIG = {"block_n": 128, "stages": 2, "pingpong": True, "consumer_regs": 240, "copy_regs": 56}
# Three warpgroups at launch (consumer, consumer, copy warp + idle): 65,536 / 384 registers each, which
# the copy warp gives down to COPY_REGS and the consumers take up.
LAUNCH_REGS = 168
logger = logging.getLogger(__name__)


class _ArgFields:
    q_ptr: gl.tensor
    out_ptr: gl.tensor
    k_desc: tma.tensor_descriptor
    v_desc: tma.tensor_descriptor
    v_cache_ptr: gl.tensor
    table: gl.tensor
    q_smem: gl.shared_memory_descriptor
    k_smem: gl.shared_memory_descriptor
    v_smem: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor
    k_empty: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor
    v_empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor
    q_start: gl.tensor
    query_len: gl.tensor
    context_len: gl.tensor
    seq_len: gl.tensor
    num_tiles: gl.tensor
    num_full: gl.tensor
    q_tile: gl.tensor
    kv_head: gl.tensor
    scale_log2: gl.tensor
    stride_q_tok: gl.tensor
    stride_q_head: gl.tensor
    stride_o_tok: gl.tensor
    stride_o_head: gl.tensor
    GROUP: gl.constexpr
    HEAD_DIM: gl.constexpr
    PAGE_SIZE: gl.constexpr
    BLOCK_Q: gl.constexpr
    BLOCK_N: gl.constexpr
    STAGES: gl.constexpr
    PINGPONG: gl.constexpr


_FIELDS = tuple(_ArgFields.__annotations__)
_CONSTEXPR_FIELDS = tuple(name for name, kind in _ArgFields.__annotations__.items() if kind is gl.constexpr)


@aggregate
class _Args(_ArgFields):
    """What every partition reads: pointers, descriptors, shared buffers, barriers and the program's scalars."""
    __annotations__ = _ArgFields.__annotations__

    @gluon.constexpr_function
    def __init__(self, *values):
        assert len(values) == len(_FIELDS)
        for i in range(len(values)):
            value = gl.constexpr(values[i]) if _FIELDS[i] in _CONSTEXPR_FIELDS else values[i]
            setattr(self, _FIELDS[i], value)


@gluon.jit
def _page_row(a, key):
    """Cache row of key `key`, a scalar or a vector (clamped to the sequence's last key, so any key is
    safe to ask for)."""
    key = gl.minimum(key, a.seq_len - 1)
    return gl.load(a.table + key // a.PAGE_SIZE) * a.PAGE_SIZE + key % a.PAGE_SIZE


@gluon.jit
def _copy_partial_v(a, smem, tile):
    """V tile that runs past the sequence's end, through registers: rows past the end become zeros."""
    CHUNK: gl.constexpr = 16
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
    dims = gl.arange(0, a.HEAD_DIM, layout=gl.SliceLayout(0, layout))
    width = a.v_desc.shape[1]
    for c in gl.static_range(a.BLOCK_N // CHUNK):
        key = tile * a.BLOCK_N + c * CHUNK + rows
        live = key < a.seq_len
        offs = _page_row(a, key).to(gl.int64)[:, None] * width + a.kv_head * a.HEAD_DIM + dims[None, :]
        smem.slice(c * CHUNK, CHUNK).store(gl.load(a.v_cache_ptr + offs, mask=live[:, None], other=0.0))
    fence_async_shared()


@gluon.jit
def _issue(desc, smem, bar, a, tile):
    """Bulk-copy key tile `tile` of this program's KV head (BLOCK_N // PAGE_SIZE pages, or part of one)."""
    ROWS: gl.constexpr = desc.block_type.shape[0]
    mbarrier.expect(bar, desc.block_type.nbytes * (a.BLOCK_N // ROWS))
    for r in gl.static_range(a.BLOCK_N // ROWS):
        row = _page_row(a, tile * a.BLOCK_N + r * ROWS)
        tma.async_copy_global_to_shared(desc, [row, a.kv_head * a.HEAD_DIM], bar, smem.slice(r * ROWS, ROWS))


@gluon.jit
def _copy_partition(a):
    for tile in range(a.num_tiles):
        st = tile % a.STAGES
        ph = (tile // a.STAGES) & 1
        mbarrier.wait(a.k_empty.index(st), ph ^ 1)
        _issue(a.k_desc, a.k_smem.index(st), a.k_ready.index(st), a, tile)
        mbarrier.wait(a.v_empty.index(st), ph ^ 1)
        if (tile + 1) * a.BLOCK_N <= a.seq_len:
            _issue(a.v_desc, a.v_smem.index(st), a.v_ready.index(st), a, tile)
        else:
            _copy_partial_v(a, a.v_smem.index(st), tile)
            mbarrier.arrive(a.v_ready.index(st), count=1)


@gluon.jit
def _softmax(s, m_i, l_i, tile, q_pos, scale_log2, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
             MASKED: gl.constexpr):
    if MASKED:  # the causal band (and keys past the sequence's end, which no row sees either)
        k_idx = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(k_idx[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
    p = gl.exp2(s * scale_log2 - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _take_turn(a, W: gl.constexpr, i):
    if a.PINGPONG:  # warpgroup 0 goes first: a fresh barrier's "previous" phase counts as complete
        mbarrier.wait(a.turn.index(W), (i & 1) ^ (1 - W))


@gluon.jit
def _pass_turn(a, W: gl.constexpr):
    if a.PINGPONG:
        mbarrier.arrive(a.turn.index(1 - W), count=1)


@gluon.jit
def _step(a, W: gl.constexpr, tile, acc, p_prev, m_i, l_i, q_pos, s_zero, s_layout: gl.constexpr,
          o_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr):
    st = tile % a.STAGES
    prev = (tile - 1) % a.STAGES
    q_smem = a.q_smem.index(W)
    mbarrier.wait(a.k_ready.index(st), (tile // a.STAGES) & 1)
    mbarrier.wait(a.v_ready.index(prev), ((tile - 1) // a.STAGES) & 1)
    _take_turn(a, W, tile)
    s = warpgroup_mma(q_smem, a.k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc = warpgroup_mma(p_prev, a.v_smem.index(prev), acc, is_async=True)
    _pass_turn(a, W)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    mbarrier.arrive(a.k_empty.index(st), count=1)
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, tile, q_pos, a.scale_log2, s_layout, a.BLOCK_N, MASKED)
    p_next = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
    mbarrier.arrive(a.v_empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return acc, p_next, m_i, l_i


@gluon.jit
def _consumer(a, W: gl.constexpr):
    """Warpgroup W: query rows W * 64 .. W * 64 + 63 of the program's tile."""
    dtype: gl.constexpr = a.k_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, a.BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, a.HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

    rows = W * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, io_layout))
    dims = gl.arange(0, a.HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    q_idx = a.q_tile * a.BLOCK_Q + rows // a.GROUP
    tok = (a.q_start + q_idx).to(gl.int64)
    head = a.kv_head * a.GROUP + rows % a.GROUP
    live = (q_idx < a.query_len)[:, None]
    q = gl.load(a.q_ptr + tok[:, None] * a.stride_q_tok + head[:, None] * a.stride_q_head + dims[None, :], mask=live,
                other=0.0)
    q_smem = a.q_smem.index(W)
    q_smem.store(q)
    fence_async_shared()
    gl.thread_barrier()  # the warpgroup's product reads every warp's rows

    q_pos = a.context_len + a.q_tile * a.BLOCK_Q + (
        W * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))) // a.GROUP
    m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([WG_ROWS, a.HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([WG_ROWS, a.BLOCK_N], gl.float32, layout=s_layout)

    # Tile 0: scores and softmax; its P V goes with tile 1's scores.
    mbarrier.wait(a.k_ready.index(0), 0)
    _take_turn(a, W, 0)
    s = warpgroup_mma(q_smem, a.k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pass_turn(a, W)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(a.k_empty.index(0), count=1)
    if a.num_full == 0:
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, q_pos, a.scale_log2, s_layout, a.BLOCK_N, True)
    else:
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, q_pos, a.scale_log2, s_layout, a.BLOCK_N, False)
    p_prev = gl.convert_layout(p.to(dtype), p_layout)

    for tile in range(1, a.num_full):  # keys every row sees: no masks
        acc, p_prev, m_i, l_i = _step(a, W, tile, acc, p_prev, m_i, l_i, q_pos, s_zero, s_layout, o_layout,
                                      p_layout, False)
    for tile in range(gl.maximum(a.num_full, 1), a.num_tiles):  # the causal band
        acc, p_prev, m_i, l_i = _step(a, W, tile, acc, p_prev, m_i, l_i, q_pos, s_zero, s_layout, o_layout,
                                      p_layout, True)

    last = a.num_tiles - 1
    mbarrier.wait(a.v_ready.index(last % a.STAGES), (last // a.STAGES) & 1)
    acc = warpgroup_mma(p_prev, a.v_smem.index(last % a.STAGES), acc)
    mbarrier.arrive(a.v_empty.index(last % a.STAGES), count=1)

    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    # Through this warpgroup's Q buffer (its last reader, the last S product, is done): a layout
    # conversion would take a scratch buffer of its own, shared memory the stages need.
    q_smem.store(out.to(dtype))
    gl.thread_barrier()
    out = q_smem.load(io_layout)
    gl.store(a.out_ptr + tok[:, None] * a.stride_o_tok + head[:, None] * a.stride_o_head + dims[None, :], out,
             mask=live)


@gluon.jit
def _consumer_0(a):
    _consumer(a, 0)


@gluon.jit
def _consumer_1(a):
    _consumer(a, 1)


# Metadata pointers unspecialised on alignment: a mixed step's prefill part slices them at any sequence.
@gluon.jit(do_not_specialize=["stride_bt", "block_table_ptr", "seq_lens_ptr", "query_start_loc_ptr"])
def _ws_prefill_kernel(
    q_ptr, k_desc, v_desc, v_cache_ptr, out_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr, scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, COPY_REGS: gl.constexpr,
):
    BLOCK_Q: gl.constexpr = 2 * WG_ROWS // GROUP
    seq = gl.program_id(0)
    q_tile = gl.program_id(1)
    kv_head = gl.program_id(2)
    q_start = gl.load(query_start_loc_ptr + seq)
    query_len = gl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= query_len:
        return
    seq_len = gl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len
    kv_end = context_len + gl.minimum((q_tile + 1) * BLOCK_Q, query_len)
    num_tiles = gl.cdiv(kv_end, BLOCK_N)
    num_full = (context_len + q_tile * BLOCK_Q + 1) // BLOCK_N
    table = block_table_ptr + seq.to(gl.int64) * stride_bt
    dtype: gl.constexpr = k_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, [2, WG_ROWS, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([WG_ROWS, HEAD_DIM], dtype))
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()

    a = _Args(q_ptr, out_ptr, k_desc, v_desc, v_cache_ptr, table, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
              v_empty, turn, q_start, query_len, context_len, seq_len, num_tiles, num_full, q_tile, kv_head,
              scale_log2, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, GROUP, HEAD_DIM, PAGE_SIZE,
              BLOCK_Q, BLOCK_N, STAGES, PINGPONG)
    gl.warp_specialize([(_consumer_0, (a, )), (_consumer_1, (a, )), (_copy_partition, (a, ))], [4, 1],
                       [CONSUMER_REGS, COPY_REGS])


def supports(page_size: int, head_dim: int, num_heads: int, num_kv_heads: int, kv_dtype: torch.dtype,
             config: dict | None = None) -> bool:
    """Head dim 128, pages of 64 keys or more that tile into key tiles, GQA groups that divide the
    64 rows of a warpgroup, 16-bit KV."""
    cfg = {**CONFIG, **(config or {})}
    group, block_n = num_heads // num_kv_heads, cfg["block_n"]
    return (head_dim == 128 and page_size >= 64 and (page_size % block_n == 0 or block_n % page_size == 0)
            and WG_ROWS % group == 0 and kv_dtype in (torch.float16, torch.bfloat16))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      num_seqs: int, max_query_len: int, scale: float, config: dict | None = None) -> torch.Tensor:
    cfg = {**CONFIG, **(config or {})}
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_blocks, page_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    if not supports(page_size, head_dim, num_heads, num_kv_heads, k_cache.dtype, cfg):
        raise ValueError(f"hopper prefill attention: unsupported page {page_size}, head dim {head_dim}, "
                         f"{num_heads}/{num_kv_heads} heads, {k_cache.dtype}")
    group = num_heads // num_kv_heads
    rows = min(page_size, cfg["block_n"])
    gl_dtype = gl.bfloat16 if k_cache.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)
    width = num_kv_heads * head_dim
    descs = [TensorDescriptor(c.view(num_blocks * page_size, width), [num_blocks * page_size, width], [width, 1],
                              [rows, head_dim], layout) for c in (k_cache, v_cache)]
    grid = (num_seqs, triton.cdiv(max_query_len, 2 * WG_ROWS // group), num_kv_heads)
    _ws_prefill_kernel[grid](
        q, descs[0], descs[1], v_cache, out, block_table, seq_lens, query_start_loc, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_N=cfg["block_n"], STAGES=cfg["stages"],
        PINGPONG=cfg["pingpong"], CONSUMER_REGS=cfg["consumer_regs"], COPY_REGS=cfg["copy_regs"], num_warps=4,
        maxnreg=LAUNCH_REGS)
    return out


class HopperPrefillAttention:
    """What the platform hands the attention backend. A Triton whose Gluon API differs from the one
    this kernel is written for (3.6) fails when the kernel compiles: the kernel is then switched off
    with a warning and None tells the caller to use the portable kernel."""

    def __init__(self):
        self.enabled = True

    def supports(self, page_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 kv_dtype: torch.dtype) -> bool:
        return self.enabled and supports(page_size, head_dim, num_heads, num_kv_heads, kv_dtype)

    def __call__(self, *args, **kwargs) -> torch.Tensor | None:
        try:
            return prefill_attention(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (compile errors differ in kind across Triton versions)
            self.enabled = False
            logger.warning("Hopper prefill attention disabled, using the portable kernel: %s: %s",
                           type(exc).__name__, str(exc)[:300])
            return None
