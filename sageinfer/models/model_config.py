"""What the engine needs from an HF config.json, normalised across the spellings in the wild."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    dtype: str | None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _rope(raw: dict) -> tuple[float, dict | None]:
    """rope_theta + rope_scaling (checkpoints) or rope_parameters (transformers 5)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    theta = raw.get("rope_theta") or (params or {}).get("rope_theta") or 10000.0
    scaling = raw.get("rope_scaling") or params
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def load_model_config(model_dir: str) -> ModelConfig:
    if not os.path.isdir(model_dir):
        raise ValueError(f"no such directory {model_dir!r}; model hub ids are not supported here, pass a local "
                         "directory with the model's config.json and weights")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model directory {model_dir!r} has no config.json")
    with open(path) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(f"model architecture {archs} is not supported; supported: {', '.join(SUPPORTED)}")
    heads = raw["num_attention_heads"]
    theta, scaling = _rope(raw)
    eos = _as_list(raw.get("eos_token_id"))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos += [t for t in _as_list(json.load(f).get("eos_token_id")) if t not in eos]
    sliding = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
    return ModelConfig(
        architecture=arch,
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        vocab_size=raw["vocab_size"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        # Qwen2 always has q/k/v bias; Llama-family configs say so with attention_bias.
        attention_bias=arch == "Qwen2ForCausalLM" or raw.get("attention_bias", False),
        qk_norm=arch == "Qwen3ForCausalLM",
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        eos_token_ids=eos,
        sliding_window=sliding,
        hidden_act=raw.get("hidden_act", "silu"),
    )
