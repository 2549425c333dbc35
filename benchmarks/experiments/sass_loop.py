"""A Triton kernel's inner loop as an sm_90 GPU runs it, counted on a machine without a GPU: a call of
one of our ops is run with its kernel's launch intercepted, the launch is compiled for sm_90 (Triton
compiles for a target it is not running on), and the instructions of its largest loop are counted by
opcode with cuobjdump. What found FP8 attention's per-element F2F (1,453 instructions a decode tile
against 613 over bf16) and INT8 weights' I2F in the skinny GEMV.

  python benchmarks/experiments/sass_loop.py decode-attention --kv fp8
  python benchmarks/experiments/sass_loop.py prefill-attention --kv int8
  python benchmarks/experiments/sass_loop.py gemv --weights int8
  python benchmarks/experiments/sass_loop.py gemv --weights fp8 --group 128
  python benchmarks/experiments/sass_loop.py int4-gemv [--norm]
  python benchmarks/experiments/sass_loop.py int4-gemv --half-sums ptx --ahead 2 --fp4 e4m3
  python benchmarks/experiments/sass_loop.py fp8-block-matmul --rows 16 [--weights int8]
  python benchmarks/experiments/sass_loop.py int4-mma --rows 16 [--fp4 e4m3]

Counts are per thread and per loop trip; what a trip covers (keys, weights) follows from the printed
tile sizes and warps. Fewer instructions is not the same as faster: time on a GPU before deciding.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"  # launches are intercepted, never run

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

POINTER = {torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64", torch.bfloat16: "*bf16",
           torch.float16: "*fp16", torch.float8_e4m3fn: "*fp8e4nv", torch.int8: "*i8", torch.uint8: "*u8"}


def compile_launch(module, kernel_name: str, call) -> dict:
    """Run call() with module.kernel_name's launch intercepted; compile that launch for sm_90."""
    kernel = getattr(module, kernel_name)
    launch = {}

    class Intercept:
        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launch["args"], launch["kwargs"] = args, kwargs
            return record

    setattr(module, kernel_name, Intercept())
    try:
        call()
    finally:
        setattr(module, kernel_name, kernel)
    names = kernel.arg_names
    values = dict(zip(names, launch["args"]))
    signature, constants, options, attrs = {}, {}, {}, {}
    for name, value in launch["kwargs"].items():
        if name in ("num_warps", "num_stages"):
            options[name] = value
        elif name in names:
            values[name] = value
    for i, name in enumerate(names):
        value = values.get(name)
        if kernel.params[i].is_constexpr:
            if name in values:
                signature[name], constants[(i,)] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
            if int(value) % 16 == 0 and name not in kernel.do_not_specialize and i not in kernel.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    return {"cubin": compiled.asm["cubin"], "shared": compiled.metadata.shared, "options": options,
            "constants": {names[i[0]]: v for i, v in constants.items()}}


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's own cuobjdump prints for a compiled kernel (-sass: its instructions, -res-usage: its
    registers and shared memory)."""
    path = "/tmp/sass_loop.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcodes of the largest loop (a backward branch and the instructions back to its target)."""
    sass = cuobjdump(cubin, "-sass")
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    best = []
    for address, text in code:
        jump = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address:
            body = [t for a, t in code if int(jump.group(1), 16) <= a <= address]
            best = max(best, body, key=len)
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in best)


def spills(cubin: bytes) -> int:
    """Local-memory stores and loads anywhere in the kernel (spilled registers)."""
    return len(re.findall(r"\b(STL|LDL)\b", cuobjdump(cubin, "-sass")))


def registers(cubin: bytes) -> int:
    """Registers a thread of the kernel takes."""
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, "-res-usage")).group(1))


def programs_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Programs of a kernel an sm_90 processor holds at once: by its 64K registers (allocated 256 a warp at
    a time), its 228 KB of shared memory (1 KB reserved a program), 64 warps and 32 programs."""
    return min(233472 // (shared + 1024), 65536 // ((regs * 32 + 255) // 256 * 256 * num_warps), 64 // num_warps, 32)


def decode_attention(args):
    import sageinfer.ops.paged_attention as pa
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[args.kv]
    seqs, heads, kv_heads, dim, page, keys = 256, 32, 8, 128, 64, 640
    blocks = seqs * keys // page
    k_cache = torch.zeros(blocks, page, kv_heads, dim, dtype=dtype)
    q = torch.randn(seqs, heads, dim, dtype=torch.bfloat16)
    scales = torch.ones(blocks, page, kv_heads) if args.kv == "int8" else None
    mode = {"bf16": 0, "fp8": 1, "int8": 2}[args.kv]
    return pa, "_paged_attention_kernel", lambda: pa.paged_attention(
        q, k_cache, k_cache.clone(), torch.empty_like(q), torch.arange(blocks, dtype=torch.int32).view(seqs, -1),
        torch.full((seqs,), keys, dtype=torch.int32), torch.arange(seqs + 1, dtype=torch.int32), seqs, 1, 0.08,
        max_seq_len=keys, k_scale=scales, v_scale=scales, kv_mode=mode)


def prefill_attention(args):
    """T1's prefill: 16 prompts of 1,024 tokens, pages of 64, ops/prefill_attention's short-prompt tiles."""
    import sageinfer.ops.prefill_attention as pf
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[args.kv]
    seqs, heads, kv_heads, dim, page, keys = 16, 32, 8, 128, 64, 1024
    blocks = seqs * keys // page
    k_cache = torch.zeros(blocks, page, kv_heads, dim, dtype=dtype)
    q = torch.randn(seqs * keys, heads, dim, dtype=torch.bfloat16)
    scales = torch.ones(blocks, page, kv_heads) if args.kv == "int8" else None
    return pf, "_prefill_attention_kernel", lambda: pf.prefill_attention(
        q, k_cache, k_cache.clone(), torch.empty_like(q), torch.arange(blocks, dtype=torch.int32).view(seqs, -1),
        torch.full((seqs,), keys, dtype=torch.int32), torch.arange(0, seqs * keys + 1, keys, dtype=torch.int32),
        seqs, keys, 0.08, max_seq_len=keys, k_scale=scales, v_scale=scales)


def gemv(args):
    import sageinfer.ops.gemv as g
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[args.weights]
    weight = torch.zeros(4096, 4096, dtype=dtype)
    scale = None if args.weights == "bf16" else torch.ones(4096, 4096 // args.group) if args.group else torch.ones(4096)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    if args.group:  # ops/gemv_grouped.py's kernel
        import sageinfer.ops.gemv_grouped as grouped
        return grouped, "_grouped_gemv_kernel", lambda: g.gemv(x, weight, weight_scale=scale)
    if not args.elements:  # ops/gemv_words.py's kernel, sm_90's path
        import sageinfer.ops.gemv_words as f
        config = dict(f.WORDS_CONFIGS[f.KINDS[dtype]], ptx=True)
        return f, "_gemv_words_kernel", lambda: g.gemv(x, weight, weight_scale=scale, config=config)
    config = {"elements": True}
    return g, "_gemv_kernel", lambda: g.gemv(x, weight, weight_scale=scale, config=config)


def _int4_one_row_call(args):
    """ops/gemv_int4.int4_gemv's arguments at Qwen3-8B's 4096 x 4096, group 128 (FP4: NVFP4's 16 or MXFP4's
    32, scale bytes and row scales), slices of 128, one row."""
    n, k, slice_width = 4096, 4096, 128
    group = {"e4m3": 16, "e8m0": 32}.get(args.fp4, 128)
    norm = torch.ones(k, dtype=torch.bfloat16) if args.norm else None
    scale = torch.ones(n, k // group, dtype=torch.uint8 if args.fp4 else torch.bfloat16)
    return (torch.randn(1, k, dtype=torch.bfloat16), torch.zeros(n, k // 8, dtype=torch.int32), scale, None, group,
            slice_width, torch.empty(1, n, dtype=torch.bfloat16), None, False, norm, 1e-6, False)


def int4_gemv(args):
    import sageinfer.ops.gemv_int4 as g
    cfg = dict(g.INT4_GEMV_CONFIG, half_sums=args.half_sums != "off", ptx=args.half_sums == "ptx", ahead=args.ahead,
               min_programs=args.min_programs)
    fp4 = {"fp4": args.fp4, "row_scale": torch.ones(4096)} if args.fp4 else {}
    return g, "_int4_gemv_kernel", lambda: g.int4_gemv(*_int4_one_row_call(args), cfg, **fp4)


def int4_mma(args):
    """ops/gemv_int4.w4a16_mma_matmul at 4096 x 4096, --rows rows, slices of 128: W4A16 groups of 128, or FP4."""
    import sageinfer.ops.gemv_int4 as g
    n, k, group = 4096, 4096, {"e4m3": 16, "e8m0": 32}.get(args.fp4, 128)
    scale = torch.ones(n, k // group, dtype=torch.uint8 if args.fp4 else torch.bfloat16)
    fp4 = {"fp4": args.fp4, "row_scale": torch.ones(n)} if args.fp4 else {}
    x = torch.randn(args.rows, k, dtype=torch.bfloat16)
    return g, "_int4_gemv_mma_kernel", lambda: g.w4a16_mma_matmul(x, torch.zeros(n, k // 8, dtype=torch.int32), scale,
                                                                  None, group, 128, **fp4)


def fp8_block_matmul(args):
    import sageinfer.ops.weight_only as wo
    weight = torch.zeros(4096, 4096, dtype=torch.int8 if args.weights == "int8" else torch.float8_e4m3fn)
    x = torch.randn(args.rows, 4096, dtype=torch.bfloat16)
    return wo, "_weight_only_kernel", lambda: wo.w8a16_block_matmul(x, weight, torch.ones(4096, 32), 128)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["decode-attention", "prefill-attention", "gemv", "int4-gemv", "int4-mma",
                                       "fp8-block-matmul"])
    parser.add_argument("--kv", default="bf16", choices=["bf16", "fp8", "int8"])
    parser.add_argument("--weights", default="bf16", choices=["bf16", "fp8", "int8"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--norm", action="store_true", help="int4-gemv: with the RMSNorm folded in (qkv, gate_up)")
    parser.add_argument("--half-sums", default="off", choices=["off", "triton", "ptx"],
                        help="int4-gemv: the fp16 pair loop, in Triton or in NVIDIA's packed instructions")
    parser.add_argument("--min-programs", type=int, default=0, help="int4-gemv: split K up to this many programs")
    parser.add_argument("--ahead", type=int, default=1, help="int4-gemv with --half-sums: runs of words in flight")
    parser.add_argument("--fp4", choices=["e4m3", "e8m0"], help="int4-gemv, int4-mma: FP4 e2m1 words with NVFP4's (e4m3) or "
                        "MXFP4's (e8m0) scale bytes (the fp16-pair loop; --half-sums ptx for NVIDIA's)")
    parser.add_argument("--elements", action="store_true", help="gemv: ops/gemv.py's element-wise kernel (else ops/gemv_words.py's)")
    parser.add_argument("--group", type=int, default=0, help="gemv: a scale per row and group of this many columns "
                        "(block FP8, W8A16), else per row")
    args = parser.parse_args()
    module, name, call = {"decode-attention": decode_attention, "prefill-attention": prefill_attention, "gemv": gemv,
                          "int4-gemv": int4_gemv, "int4-mma": int4_mma,
                          "fp8-block-matmul": fp8_block_matmul}[args.op](args)
    compiled = compile_launch(module, name, call)
    opcodes = loop_opcodes(compiled["cubin"])
    print(name, {k: v for k, v in compiled["constants"].items() if k.isupper()}, compiled["options"],
          f"shared {compiled['shared']} B")
    print(f"loop: {sum(opcodes.values())} instructions a thread a trip;", dict(opcodes.most_common(20)))
    print("spilled to local memory (STL / LDL in the whole kernel):", spills(compiled["cubin"]))
    regs = registers(compiled["cubin"])
    print(f"registers a thread: {regs}; programs an SM at once:",
          programs_per_sm(regs, compiled["shared"], compiled["options"].get("num_warps", 4)))


if __name__ == "__main__":
    main()
