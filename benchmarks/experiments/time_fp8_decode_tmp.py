import torch, triton, sys
sys.path.insert(0, ".")
from sageinfer.ops.paged_attention import paged_attention
B, H, KVH, D, page, L = 256, 32, 8, 128, 64, 640
blocks = B * L // page
for mode, dt in ((0, torch.bfloat16), (1, torch.float8_e4m3fn)):
    kc = (torch.randn(blocks, page, KVH, D, device="cuda") * 0.5).to(dt); vc = (torch.randn_like(kc, dtype=torch.float32)).to(dt)
    q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda"); out = torch.empty_like(q)
    bt = torch.randperm(blocks, device="cuda").to(torch.int32).view(B, -1)
    sl = torch.full((B,), L, dtype=torch.int32, device="cuda"); qsl = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    f = lambda: paged_attention(q, kc, vc, out, bt, sl, qsl, B, 1, 0.08, 1, max_seq_len=L, kv_mode=mode, fp8_scale=1.0)
    t = triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") * 1e-3
    nbytes = 2 * B * L * KVH * D * kc.element_size()
    print(f"kv_mode {mode}: {t*1e6:.1f} us per layer, {nbytes / t / 1e12:.2f} TB/s of cache bytes", flush=True)
