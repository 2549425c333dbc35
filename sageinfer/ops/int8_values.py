"""INT8 values as floats without I2F: on sm_90, I2F runs at an eighth of the FP32 rate, and a kernel
that converts every 8-bit element (a weight, a cached key or value) is bound by it. Through the bits
of 1.5 * 2^23 instead (the integer added, then the float subtracted: exact, at the full rate): the
one-row INT8 GEMV's L1 TPOT on an H200 went 5.23 -> 3.76 ms (bf16 4.81)."""
import triton
import triton.language as tl


@triton.jit
def int8_as_f32(x):
    """An int8 tensor's values as fp32 (exact)."""
    return (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def values_as(x, dtype):
    """A tile's values (cached keys or values, weights) in dtype: INT8 through int8_as_f32 (integers of 8
    bits are exact in bf16 and fp16), others (16-bit, e4m3) converted directly."""
    if x.dtype == tl.int8:
        return int8_as_f32(x).to(dtype)
    return x.to(dtype)
