"""What a run achieved against the card's ceilings: bytes moved per decode step, FLOPs of a prefill."""
from __future__ import annotations


def model_sizes(llm) -> dict:
    """What a decode step reads and a token costs, from the tensors the engine holds: quantized weights,
    their scales and zero points at their own widths, the KV cache at its own (an 8-bit cache's scales
    included); the linear layers' multiply-adds (the LM head apart) from their whole shapes."""
    from sageinfer.layers.linear import Linear
    from sageinfer.layers.embedding import LMHead

    cfg = llm.engine.model_config
    runner = llm.engine.runner
    model = runner.model
    read = [t for m in model.modules() if isinstance(m, (Linear, LMHead))
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    head = getattr(model, "lm_head", None)
    matmul_params = sum(m.in_features * m.out_features for m in model.modules()
                        if isinstance(m, Linear) and m is not head)
    once = {id(t): t for t in read + norms}.values()  # a tied head is the embedding table, read once
    return {"weight_bytes_per_step": sum(t.numel() * t.element_size() for t in once),
            "matmul_params": matmul_params, "kv_bytes_per_token": runner.kv_bytes_per_block() / runner.block_size,
            "attn_width": cfg.num_attention_heads * cfg.head_dim, "layers": cfg.num_hidden_layers}


def decode_bandwidth_gbs(sizes: dict, tpot_s: float, context_len: int, batch: int = 1) -> float:
    """Weights once per step plus each sequence's KV, over one step's time."""
    step_bytes = sizes["weight_bytes_per_step"] + batch * context_len * sizes["kv_bytes_per_token"]
    return step_bytes / tpot_s / 1e9


def prefill_flops(sizes: dict, prompt_len: int) -> float:
    """Linear layers on every token, causal attention (QK and PV), one lm_head row."""
    linear = 2.0 * sizes["matmul_params"] * prompt_len
    attention = 2.0 * sizes["layers"] * sizes["attn_width"] * prompt_len * prompt_len  # 4 * S^2/2 * width
    return linear + attention
