"""What a run achieved against the card's ceilings: bytes moved per decode step, FLOPs of a prefill."""
from __future__ import annotations


def model_sizes(llm) -> dict:
    cfg = llm.engine.model_config
    model = llm.engine.runner.model
    elem = next(model.parameters()).element_size()
    total = sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    matmul_params = total - embed - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    return {"weight_bytes_per_step": (total - embed) * elem + (embed * elem if cfg.tie_word_embeddings else 0),
            "matmul_params": matmul_params, "kv_bytes_per_token": kv_bytes_per_token,
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
