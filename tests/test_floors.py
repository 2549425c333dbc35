"""The workload floors of sageinfer/bench/floors.py: the model's counts against transformers' own
model, and the rooflines worked by hand on a small shape."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sageinfer.bench.floors import ModelShape, fraction_of_floor, workload_floor

SMALL = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
# 1 TFLOP/s in 16 bits, 2 in FP8, 1 GB/s: a card where decode is bound by bytes
CARD = {"bf16_matmul_tflops": 1.0, "fp8_matmul_tflops": 2.0, "copy_bandwidth_gbs": 1.0}


def test_counts_are_those_of_the_transformers_model():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    shape = ModelShape.from_config(cfg.to_dict())
    assert shape.layer_params() == linear
    assert shape.head_params() == model.lm_head.weight.numel()
    assert shape.kv_elements_per_token() == 2 * 3 * 2 * 16  # K and V, every layer, every KV head


def test_a_latency_workload_by_hand():
    w = {"kind": "latency", "input_len": 4, "output_len": 2, "batch": 1}
    floor = workload_floor(SMALL, "bf16", CARD, w)
    # layers' weights 2 x (8 x 4 x 4 + 2 x 4 x 8 + 3 x 8 x 16) = 1,152; causal pairs of 4 tokens: 10
    assert floor["ttft_s"] == pytest.approx((2 * 1152 * 4 + 4 * 2 * 2 * 4 * 10) / 1e12)
    # one step reads the 16-bit weights and LM head and 5 keys' K and V (16 elements a token)
    assert floor["tpot_s"] == pytest.approx((1152 * 2 + 80 * 2 + 5 * 16 * 2) / 1e9)
    fp8 = workload_floor(SMALL, "fp8-kv8", CARD, w)
    assert fp8["ttft_s"] == pytest.approx((2 * 1152 * 4 / 2 + 4 * 2 * 2 * 4 * 10) / 1e12)  # FP8 matmuls, bf16 attention
    assert fp8["tpot_s"] == pytest.approx((1152 + 80 * 2 + 5 * 16) / 1e9)  # the LM head stays 16-bit


def test_a_shared_prefix_is_computed_once_and_decode_is_bound_by_the_slower_side():
    w = {"kind": "throughput", "num_prompts": 3, "input_len": 4, "output_len": 3, "shared_prefix_len": 2}
    floor = workload_floor(SMALL, "bf16", CARD, w)
    tokens = 2 + 3 * 2  # the prefix once, each prompt's own two
    pairs = 3 + 3 * (2 * 2 + 3)  # the prefix causally; each prompt's two after it
    assert floor["prefill_s"] == pytest.approx((2 * 1152 * tokens + 4 * 2 * 2 * 4 * pairs) / 1e12)
    # three sequences at 4 + 3 / 2 keys on average, the shared two read once
    step_bytes = 1152 * 2 + 80 * 2 + (2 + 3 * 3.5) * 16 * 2
    assert floor["decode_s"] == pytest.approx(2 * step_bytes / 1e9)
    assert floor["seconds"] == pytest.approx(floor["prefill_s"] + floor["decode_s"])
    fast_memory = dict(CARD, copy_bandwidth_gbs=1e9)
    step_flops = 2 * 1152 * 3 + 2 * 80 * 3
    assert workload_floor(SMALL, "bf16", fast_memory, w)["decode_s"] == pytest.approx(2 * step_flops / 1e12)


def test_the_fraction_is_floor_over_measured_for_what_both_report():
    assert fraction_of_floor({"seconds": 2.0, "prefill_s": 1.0}, {"seconds": 4.0, "total_tok_s": 9.0}) == \
        {"seconds": 0.5}
    assert fraction_of_floor({"ttft_s": 1.0, "tpot_s": 3.0}, {"ttft_s": 2.0, "tpot_s": 4.0}) == \
        {"ttft_s": 0.5, "tpot_s": 0.75}


def test_an_8bit_cache_under_16bit_weights_halves_only_the_keys_bytes():
    w = {"kind": "latency", "input_len": 4, "output_len": 2, "batch": 1}
    floor = workload_floor(SMALL, "bf16-kv8", CARD, w)
    assert floor["ttft_s"] == pytest.approx((2 * 1152 * 4 + 4 * 2 * 2 * 4 * 10) / 1e12)
    assert floor["tpot_s"] == pytest.approx((1152 * 2 + 80 * 2 + 5 * 16) / 1e9)


@pytest.mark.parametrize("key", ["workloads", "results"])  # engine_bench.py's JSON, run_standard.py's
def test_the_fraction_script_reads_either_benchmark_json(tmp_path, key):
    import json
    import subprocess
    import sys
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"bf16_matmul_tflops": 800.0, "copy_bandwidth_gbs": 3000.0}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({key: {"T1-prefill-heavy": {"seconds": 20.0, "total_tok_s": 32000.0}}}))
    out = subprocess.run([sys.executable, "benchmarks/fraction_of_ceilings.py", "--ceilings", str(ceilings),
                          f"bf16:{run}"], capture_output=True, text=True, check=True).stdout
    row = [line for line in out.splitlines() if "T1-prefill-heavy" in line]
    assert len(row) == 1 and "20.00 s" in row[0] and row[0].rstrip().endswith("% |")


def test_a_scheduled_step_runs_its_kernels_one_after_another_each_at_its_ceiling():
    from sageinfer.bench.floors import causal_pairs, scheduled_step_seconds
    # 100 rows on a card of fast memory: the layers' and the head's FLOPs outlast their bytes
    fast_memory = dict(CARD, copy_bandwidth_gbs=1e6)
    prefill = scheduled_step_seconds(SMALL, "bf16", fast_memory, tokens=100, sampled_rows=1,
                                     prefill_pairs=causal_pairs(100, 0), decode_keys=0)
    assert prefill == pytest.approx((2 * 1152 * 100 + 2 * 80 + 4 * 2 * 2 * 4 * 5050) / 1e12)
    # the same rows on the slow card: the weights' bytes (1,152 x 2 at 1 GB/s) outlast their FLOPs
    slow = scheduled_step_seconds(SMALL, "bf16", CARD, 100, 1, causal_pairs(100, 0), 0)
    assert slow == pytest.approx((1152 * 2 + 80 * 2) / 1e9 + 4 * 2 * 2 * 4 * 5050 / 1e12)
    # two decodes over 7 and 9 keys: the weights' bytes, then the keys' K and V (16 elements a token)
    decode = scheduled_step_seconds(SMALL, "bf16-kv8", CARD, tokens=2, sampled_rows=2, prefill_pairs=0,
                                    decode_keys=16)
    assert decode == pytest.approx(1152 * 2 / 1e9 + 80 * 2 / 1e9 + 16 * 16 * 1 / 1e9)
    assert scheduled_step_seconds(SMALL, "bf16", CARD, 2, 0, 0, 16) == pytest.approx((1152 * 2 + 16 * 16 * 2) / 1e9)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_run_rooflines_count_the_bytes_the_engine_holds(llama_dir, quantization):
    """A run's decode bandwidth counts each weight at the width the engine keeps it (INT8 one byte and a scale
    per output feature), the KV cache at its own width; the multiply-adds are the model's, whatever the scheme."""
    import json
    import os

    from sageinfer import LLM
    from sageinfer.bench.roofline import model_sizes
    with open(os.path.join(llama_dir, "config.json")) as f:
        shape = ModelShape.from_config(json.load(f))
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=80, show_progress=False, quantization=quantization,
              kv_cache_dtype="int8" if quantization else "auto")
    try:
        sizes = model_sizes(llm)
        model = llm.engine.runner.model
        norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
        assert sizes["matmul_params"] == shape.layer_params()
        linear_outputs = shape.layers * (2 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim
                                         + 2 * shape.intermediate)  # o, down; qkv; gate_up
        if quantization is None:  # float32 everything
            expected = 4 * (shape.layer_params() + shape.head_params() + norms)
            per_token = 4 * shape.kv_elements_per_token()
        else:  # one byte a weight, a float32 scale an output feature; one byte a cached value, a float32 scale a head
            expected = shape.layer_params() + 4 * linear_outputs + 4 * (shape.head_params() + norms)
            per_token = shape.kv_elements_per_token() + 4 * 2 * shape.layers * shape.kv_heads
        assert sizes["weight_bytes_per_step"] == expected
        assert sizes["kv_bytes_per_token"] == per_token
    finally:
        llm.engine.shutdown()
