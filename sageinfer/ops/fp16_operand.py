"""16-bit operands for tensor-core dots over FP8 values. fp8 -> fp16 is one native conversion a pair
of values, where fp8 -> bf16 goes through fp32 one element at a time (compiled for sm_90, a decode
attention tile over an FP8 cache: 1,453 instructions through bf16, 1,037 through fp16; on an H200
178 -> 140 us a layer). A bf16 operand on the other side is moved to fp16 times 2^-8: exact, it keeps
any |x| below 2^24 finite in fp16 with at least bf16's precision above 2^-6, and the caller gives
the factor back after the dot."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP16_OPERAND_SCALE = 256.0


@triton.jit
def fp16_operand(x, scale):
    """x as an fp16 dot operand: bf16 times scale (1 / FP16_OPERAND_SCALE), fp16 as it is. The scale
    must come as a kernel argument: as a constant the compiler multiplied after narrowing to fp16,
    where an |x| past 65,504 had already become inf."""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.float32) * scale).to(tl.float16)
    return x


def fp16_operand_factor(x: torch.Tensor) -> float:
    """What fp16_operand divides x by: the launcher passes its inverse and multiplies it back."""
    return FP16_OPERAND_SCALE if x.dtype == torch.bfloat16 else 1.0
