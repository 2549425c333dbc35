"""The time a standard workload cannot go below on a card, from its measured ceilings
(benchmarks/ceilings.py) and the model's shapes: a roofline per phase.

- Prefill: the prompt tokens that must be computed (a shared prefix once: prefix caching is allowed)
  through the linear layers at the scheme's matmul rate, and causal attention at the bf16 rate.
- Decode: one step per generated token after the first (every sequence of the workload decodes in one
  batch: the standard workloads have fewer prompts than the engines' 1,024 sequences); a step takes at
  least the longer of its matmul FLOPs at the scheme's rate (the LM head at bf16's) and its bytes at
  the copy bandwidth: every weight once, and each sequence's KV cache at the step's mean context (a
  shared prefix's once: cascade attention reads it once for the batch).
- A latency workload: TTFT the prefill of one prompt, TPOT one decode step of one sequence.

Layer weights and the KV cache are counted in the scheme's bytes; the LM head stays 16-bit (it is
not quantized by these schemes). Normalisation, rotary and sampling are left out: a floor, not a model.
"""
from __future__ import annotations

from dataclasses import dataclass

# Bytes a layer weight takes per scheme (4-bit formats with their group scales), and which measured
# matmul ceiling its prefill runs at (weight-only schemes multiply in 16 bits).
SCHEMES = {
    "bf16": (2.0, "bf16_matmul_tflops"),
    "bf16-kv8": (2.0, "bf16_matmul_tflops"),  # 16-bit weights over an 8-bit KV cache
    "fp8-kv8": (1.0, "fp8_matmul_tflops"),
    "fp8-block": (1.0, "fp8_matmul_tflops"),
    "int8-w8a8": (1.0, "int8_matmul_tops"),
    "w8a16": (1.0, "bf16_matmul_tflops"),
    "w4a16": (0.5 + 2 / 128, "bf16_matmul_tflops"),
    "nvfp4": (0.5 + 1 / 16, "bf16_matmul_tflops"),
    "mxfp4": (0.5 + 1 / 32, "bf16_matmul_tflops"),
}
KV_BYTES = {"fp8-kv8": 1, "bf16-kv8": 1}  # bytes a cached element takes (2: bf16)


@dataclass
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
                   cfg["num_attention_heads"], cfg["num_key_value_heads"],
                   cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"], cfg["vocab_size"])

    def layer_params(self) -> int:
        """Weights of every decoder layer's linear layers (q, k, v, o, gate, up, down)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    def head_params(self) -> int:
        return self.vocab * self.hidden

    def kv_elements_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim

    def attention_flops(self, queries: int, keys_before: int) -> float:
        """QK and PV of `queries` new tokens after `keys_before` cached ones, causal."""
        return self.attention_flops_of_pairs(causal_pairs(queries, keys_before))

    def attention_flops_of_pairs(self, pairs: float) -> float:
        """QK and PV over `pairs` (query, key) pairs, every layer and head."""
        return 4.0 * self.layers * self.heads * self.head_dim * pairs


def causal_pairs(queries: int, keys_before: int) -> float:
    """The (query, key) pairs `queries` new tokens attend after `keys_before` cached ones, themselves causally."""
    return queries * keys_before + queries * (queries + 1) / 2


def _rate(ceilings: dict, key: str) -> float:
    return ceilings[key] * 1e12


def prefill_seconds(shape: ModelShape, scheme: str, ceilings: dict, tokens: int, attention_flops: float) -> float:
    matmul = _rate(ceilings, SCHEMES[scheme][1])
    return 2.0 * shape.layer_params() * tokens / matmul + attention_flops / _rate(ceilings, "bf16_matmul_tflops")


def decode_step_seconds(shape: ModelShape, scheme: str, ceilings: dict, batch: int, context: float,
                        shared: int = 0) -> float:
    """One step of `batch` sequences at `context` keys each, the first `shared` of them common to all."""
    weight_bytes, rate_key = SCHEMES[scheme]
    flops_time = (2.0 * shape.layer_params() * batch / _rate(ceilings, rate_key)
                  + 2.0 * shape.head_params() * batch / _rate(ceilings, "bf16_matmul_tflops"))
    keys = shared + batch * (context - shared)
    step_bytes = (shape.layer_params() * weight_bytes + shape.head_params() * 2
                  + keys * shape.kv_elements_per_token() * KV_BYTES.get(scheme, 2))
    return max(flops_time, step_bytes / (ceilings["copy_bandwidth_gbs"] * 1e9))


def scheduled_step_seconds(shape: ModelShape, scheme: str, ceilings: dict, tokens: int, sampled_rows: int,
                           prefill_pairs: float, decode_keys: int) -> float:
    """One step of an engine's schedule, its kernels one after another, each at its ceiling: the decoder layers'
    matmuls over `tokens` rows (the longer of their FLOPs and their weights' bytes), the LM head over the
    `sampled_rows`, prefill attention over `prefill_pairs` at the bf16 rate, and the decodes' `decode_keys`
    cached keys read at the copy bandwidth. Tighter than workload_floor, which lets every sequence decode in one
    batch: a cache too small for that, or a mix, takes more steps, each reading the weights again."""
    weight_bytes, rate_key = SCHEMES[scheme]
    bandwidth, bf16 = ceilings["copy_bandwidth_gbs"] * 1e9, _rate(ceilings, "bf16_matmul_tflops")
    layers = max(2.0 * shape.layer_params() * tokens / _rate(ceilings, rate_key),
                 shape.layer_params() * weight_bytes / bandwidth)
    head = max(2.0 * shape.head_params() * sampled_rows / bf16, shape.head_params() * 2 / bandwidth) \
        if sampled_rows else 0.0
    attention = (shape.attention_flops_of_pairs(prefill_pairs) / bf16
                 + decode_keys * shape.kv_elements_per_token() * KV_BYTES.get(scheme, 2) / bandwidth)
    return layers + head + attention


def workload_floor(shape: ModelShape, scheme: str, ceilings: dict, w: dict) -> dict:
    """A throughput workload: {"seconds"} its floor; a latency one: {"ttft_s", "tpot_s"}."""
    prompt, out = w["input_len"], w["output_len"]
    context = prompt + out / 2  # a decode step's mean keys over the run
    if w["kind"] == "latency":
        return {"ttft_s": prefill_seconds(shape, scheme, ceilings, prompt, shape.attention_flops(prompt, 0)),
                "tpot_s": decode_step_seconds(shape, scheme, ceilings, 1, context)}
    n, shared = w["num_prompts"], w.get("shared_prefix_len", 0)
    unique = prompt - shared
    tokens = shared + n * unique
    attention = shape.attention_flops(shared, 0) + n * shape.attention_flops(unique, shared)
    prefill = prefill_seconds(shape, scheme, ceilings, tokens, attention)
    decode = (out - 1) * decode_step_seconds(shape, scheme, ceilings, n, context, shared)
    return {"seconds": prefill + decode, "prefill_s": prefill, "decode_s": decode}


def fraction_of_floor(floor: dict, measured: dict) -> dict:
    """Floor time over measured time (1.0: at the ceilings) per metric the two share."""
    return {key: floor[key] / measured[key] for key in ("seconds", "ttft_s", "tpot_s")
            if key in floor and key in measured}
