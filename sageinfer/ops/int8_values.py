"""INT8 values as floats without I2F: on sm_90, I2F runs at an eighth of the FP32 rate, and a kernel
that converts every 8-bit element (a weight, a cached key or value) is bound by it. Through the bits
of 1.5 * 2^23 instead (the integer added, then the float subtracted: exact, at the full rate): the
one-row INT8 GEMV's L1 TPOT on an H200 went 5.23 -> 3.76 ms (bf16 4.81).

Attention tiles read INT8 cache rows as 32-bit words and make fp16 of them through the bits of 1024
(int8_rows_fp16): converted in the layout they were loaded in, the tile reaches the dot through
16-bit shared-memory transfers, where converting after the load let the compiler feed the dot from
8-bit shared memory one byte at a time (there is no 8-bit transposing ldmatrix for V). Compiled for
sm_90, a decode tile of 64 keys x 128 dims over an INT8 cache: 1,470 -> 1,044 instructions a thread
(bf16 604, FP8 1,003; benchmarks/experiments/sass_loop.py). Not yet timed on a GPU: attention takes
this path with SAGEINFER_INT8_KV_WORDS=1 (ops/paged_attention.py)."""
import torch
import triton
import triton.language as tl


@triton.jit
def int8_as_f32(x):
    """An int8 tensor's values as fp32 (exact)."""
    return (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def cache_values_as(x, dtype):
    """A cache tile's values in the dot's dtype: INT8 through int8_as_f32 (integers of 8 bits are exact
    in bf16 and fp16), others (16-bit, e4m3) converted directly."""
    if x.dtype == tl.int8:
        return int8_as_f32(x).to(dtype)
    return x.to(dtype)


def int8_words_supported(cache: torch.Tensor) -> bool:
    """Whether a [blocks, slots, heads, head_dim] INT8 cache's rows can be read as 32-bit words."""
    return (cache.dtype == torch.int8 and cache.shape[-1] % 4 == 0 and cache.data_ptr() % 4 == 0
            and all(stride % 4 == 0 for stride in cache.stride()[:-1]) and cache.stride(-1) == 1)


@triton.jit
def _half_as_fp16(bits, SHIFT: tl.constexpr):
    """The 16 bits at SHIFT of 32, fp16 1024 + b for a byte b below 0x64's exponent, minus 1152."""
    return (bits >> SHIFT).to(tl.uint16).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def int8_rows_fp16(cache_ptr, slot_offs, k_valid, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   MASKED: tl.constexpr):
    """The INT8 rows at byte offsets slot_offs [keys] (multiples of 4, int8_words_supported) as an fp16
    [keys, HEAD_DIM_PAD] tile, exact, its lanes in the order int8_word_lanes gives. Each word's bytes,
    biased by 128, are placed two at a time under fp16's exponent of 1024 (one AND-OR for two values),
    and 1024 + 128 is subtracted."""
    WORDS: tl.constexpr = HEAD_DIM_PAD // 4
    words = tl.arange(0, WORDS)
    ptrs = cache_ptr.to(tl.pointer_type(tl.uint32)) + (slot_offs // 4)[:, None] + words[None, :]
    # Rows and dims out of range read as 0 (values of -128): finite, and the caller masks them (a key's
    # score, a value's probability) or they meet the query's zeros (padded dims).
    if HEAD_DIM != HEAD_DIM_PAD:
        if MASKED:
            w = tl.load(ptrs, mask=k_valid[:, None] & (words < HEAD_DIM // 4)[None, :], other=0)
        else:
            w = tl.load(ptrs, mask=(words < HEAD_DIM // 4)[None, :], other=0)
    elif MASKED:
        w = tl.load(ptrs, mask=k_valid[:, None], other=0)
    else:
        w = tl.load(ptrs)
    biased = w ^ 0x80808080
    even = (biased & 0x00FF00FF) | 0x64006400  # bytes 0 and 2, one in each half
    odd = ((biased >> 8) & 0x00FF00FF) | 0x64006400  # bytes 1 and 3
    # join(join(x0, x1), join(x2, x3)) flattens as x0, x2, x1, x3: lanes hold bytes 0, 2, 1, 3 of each
    # word, so each pair of lanes is one of the registers made above (in memory order, repacking them
    # took a PRMT for every two values: 1,196 instructions against 1,052).
    quads = tl.join(tl.join(_half_as_fp16(even, 0), _half_as_fp16(odd, 0)),
                    tl.join(_half_as_fp16(even, 16), _half_as_fp16(odd, 16)))
    return tl.reshape(quads, (slot_offs.shape[0], HEAD_DIM_PAD))


@triton.jit
def int8_word_lanes(lanes):
    """The dim that each lane of an int8_rows_fp16 tile holds (bits 0 and 1 swapped): a kernel that
    indexes its query, output and partials by these dims works in the tile's lane order throughout."""
    return (lanes & ~3) | ((lanes & 1) << 1) | ((lanes >> 1) & 1)
