"""Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm).

Plain PyTorch; the cleverness lives in layers/ and the attention backend.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from sageinfer.attention.backend import AttentionBackend, AttentionMetadata, LayerKVCache
from sageinfer.distributed.parallel_state import get_tp_group, kv_head_range
from sageinfer.layers.activation import SiluAndMul
from sageinfer.layers.attention import Attention
from sageinfer.layers.embedding import LMHead, QuantizedLMHead, VocabEmbedding
from sageinfer.layers import linear as linear_layers
from sageinfer.layers.linear import Linear, MergedLinear, QKVLinear, one_row
from sageinfer.layers.norm import RMSNorm
from sageinfer.layers.quantization.config import get_quant_config
from sageinfer.layers.rotary import RotaryEmbedding
from sageinfer.models.model_config import ModelConfig

KVCache = LayerKVCache


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        # This rank's heads (all of them at tp=1); KV heads replicated when fewer than the ranks.
        tp = get_tp_group()
        self.num_heads, self.head_dim = tp.split(cfg.num_attention_heads), cfg.head_dim
        self.num_kv_heads = kv_head_range(cfg.num_key_value_heads, tp)[1]
        self.qkv_proj = QKVLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                                  cfg.attention_bias)
        self.o_proj = Linear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False, parallel="row")
        # Checkpoint names: self_attn.q_norm / k_norm (Qwen3); they live inside attn here.
        q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, rotary, q_norm, k_norm)
        # The checkpoint's calibrated FP8 KV scales ("k" and "v": compressed-tensors' kv_cache_scheme,
        # per tensor or per head; "kv": older FP8 checkpoints' one scale for both)
        self.kv_scales: dict[str, float] = {}

    @property
    def fp8_kv_scale(self) -> float:
        """What an FP8 cache's values are multiplied by: the larger of the checkpoint's K and V scales
        (the kernels take one a layer; a larger one loses no range), 1.0 without them (as vLLM)."""
        return max(self.kv_scales.values()) if self.kv_scales else 1.0

    def forward(self, positions, hidden, kv_cache: KVCache, meta: AttentionMetadata, backend: AttentionBackend):
        return self.o_proj(self.attend(positions, self.qkv_proj(hidden), kv_cache, meta, backend))

    def attend(self, positions, qkv, kv_cache: KVCache, meta: AttentionMetadata, backend: AttentionBackend):
        """[T, q+k+v] projections -> [T, Hq * D] attention output, before o_proj."""
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.attn(positions, q, k, v, kv_cache, meta, backend)
        return out.reshape(-1, self.num_heads * self.head_dim)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size},
                                         parallel="column")
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, parallel="row")
        self.act = SiluAndMul()

    def forward(self, x):
        return self.down_proj.forward_gated(self.gate_up_proj(x), self.act)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions, hidden, residual, kv_cache, meta, backend):
        """Each norm goes through the matmul after it (forward_after_norm), so that an 8-bit layer
        takes its input from the norm kernel already quantized."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = attn.qkv_proj.forward_after_norm(hidden, residual, self.input_layernorm)
        hidden = attn.o_proj(attn.attend(positions, qkv, kv_cache, meta, backend))
        gate_up, residual = mlp.gate_up_proj.forward_after_norm(hidden, residual, self.post_attention_layernorm)
        return mlp.down_proj.forward_gated(gate_up, mlp.act), residual

    def forward_one_row(self, positions, residual, kv_cache, meta, backend) -> None:
        """One token (single-stream decode): the residual stream is summed in place by the matmuls
        that end each block, and each norm is folded into the matmul after it, so the layer launches
        no norm kernel. Qwen3-8B on an H100: 6.08 -> 5.92 ms per token with rotary still launched
        apart, 5.87 with both fusions (benchmarks/experiments/probe_single_stream.py)."""
        attn = self.self_attn
        self.one_row_matmuls(residual, lambda qkv: attn.attend(positions, qkv, kv_cache, meta, backend))

    def one_row_matmuls(self, residual, attend=None) -> None:
        """forward_one_row around attend(qkv) -> the attention's [1, Hq * D] output; without attend, zeros
        stand for it (start-up's warm-up of the one-row kernels: executor/linear_warm_up.py)."""
        attn, mlp = self.self_attn, self.mlp
        qkv = attn.qkv_proj.forward_normed(residual, self.input_layernorm)
        attn.o_proj.add_into(attend(qkv) if attend is not None else qkv.new_zeros(1, attn.qkv_proj.q_size), residual)
        if linear_layers.one_row_activates_before(mlp.down_proj, residual):
            mlp.down_proj.add_into(mlp.gate_up_proj.forward_normed_activated(
                residual, self.post_attention_layernorm, mlp.act), residual)
            return
        gate_up = mlp.gate_up_proj.forward_normed(residual, self.post_attention_layernorm)
        mlp.down_proj.forward_gated(gate_up, mlp.act, residual=residual)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        # One cos/sin table for every layer: per layer it was 64 MiB at Llama-3.1's 131,072 positions, 5 GiB over
        # a 70B model's 80 layers.
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta, backend):
        hidden, residual = self.embed_tokens(input_ids), None
        after_layer = meta.after_layer
        if one_row(hidden, self.layers[0].mlp.down_proj.use_triton):
            for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
                layer.forward_one_row(positions, hidden, kv_cache, meta, backend)  # hidden is summed in place
                if after_layer is not None:
                    after_layer(i)
            return self.norm(hidden)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, backend)
            if after_layer is not None:
                after_layer(i)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# HF checkpoint name fragment -> (our parameter name fragment, shard id)
_STACKED = [
    (".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", "gate"), (".up_proj.", ".gate_up_proj.", "up"),
]


# Calibrated KV cache scales: compressed-tensors' self_attn.k_scale / v_scale, an older FP8 format's one
# self_attn.kv_scale, the k_proj / v_proj output scales of the first FP8 checkpoints, or ModelOpt's
# k_proj.k_scale / v_proj.v_scale
_KV_SCALE = re.compile(r"(.*\.self_attn)\.(?:(k|v|kv)_scale|(k|v)_proj\.(?:output|\3)_scale)")


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.backend = backend
        self.model = LlamaModel(cfg)
        quant = get_quant_config()
        if quant is not None and quant.lm_head:  # the checkpoint quantizes the head (with its own tensors)
            if cfg.tie_word_embeddings:
                raise ValueError("the checkpoint quantizes lm_head of a model with tied word embeddings: not "
                                 "supported (the head would no longer be the embedding table)")
            self.lm_head = QuantizedLMHead(cfg.vocab_size, cfg.hidden_size)
        else:
            self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """The checkpoint's tensors for cfg, whole (before any tensor-parallel split), by the names and in the
        order of transformers' state dict for its model (q/k/v biases where the config has them; this model holds
        no o_proj or MLP bias): what dummy weights fill. Read from the config, not from transformers' model class,
        whose import took 6-20 s of an 8B start-up (2026-12-05e)."""
        h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
        for i in range(cfg.num_hidden_layers):
            layer = f"model.layers.{i}"
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[f"{layer}.self_attn.{name}.weight"] = (rows, h)
                if cfg.attention_bias:
                    shapes[f"{layer}.self_attn.{name}.bias"] = (rows,)
            shapes[f"{layer}.self_attn.o_proj.weight"] = (h, q)
            if cfg.qk_norm:
                shapes[f"{layer}.self_attn.q_norm.weight"] = shapes[f"{layer}.self_attn.k_norm.weight"] = (d,)
            shapes[f"{layer}.mlp.gate_proj.weight"] = shapes[f"{layer}.mlp.up_proj.weight"] = (inter, h)
            shapes[f"{layer}.mlp.down_proj.weight"] = (h, inter)
            shapes[f"{layer}.input_layernorm.weight"] = shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (cfg.vocab_size, h)  # also when tied: the state dict names both
        return shapes

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, self.backend)

    def fp8_kv_scale(self, layer: int) -> float:
        """What layer's FP8 cache values are multiplied by (the checkpoint's calibrated scales, or 1.0)."""
        return self.model.layers[layer].self_attn.fp8_kv_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters; returns the parameter names that were filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.replace(".self_attn.q_norm.", ".self_attn.attn.q_norm.").replace(
                ".self_attn.k_norm.", ".self_attn.attn.k_norm.")
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name.startswith("lm_head.") and name not in ("lm_head.weight", "lm_head.bias") \
                    and isinstance(self.lm_head, LMHead):
                raise ValueError(f"the checkpoint holds a quantized lm_head ({name!r}) that its quantization_config "
                                 "does not name (GPTQ: lm_head true; compressed-tensors: lm_head not in ignore)")
            kv_scale = _KV_SCALE.fullmatch(name)
            if kv_scale is not None:
                owner, which = kv_scale.group(1), kv_scale.group(2) or kv_scale.group(3)
                self.get_submodule(owner).kv_scales[which] = float(tensor.float().max())
                continue
            shard_id = None
            for hf_part, our_part, shard in _STACKED:
                if hf_part in name:
                    name, shard_id = name.replace(hf_part, our_part), shard
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard_id)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.add(name)
        return loaded
