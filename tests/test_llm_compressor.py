"""Checkpoints made by llm-compressor itself, the library most compressed-tensors checkpoints come from:
a tiny llama trained on the tokenizer's corpus, quantized with the schemes a user picks (W4A16 by
round-to-nearest and by GPTQ in act-order, symmetric and asymmetric, after SpinQuant's rotations; W8A16
in groups and per channel, symmetric and asymmetric, by round-to-nearest and GPTQ; FP8
dynamic, static and in blocks, with a calibrated FP8 KV cache; INT8 W8A8 through SmoothQuant then
GPTQ, and with static activation scales; FP8 attention with a 4-bit or 8-bit MLP), calibrated on the corpus
where the scheme needs data; and Qwen2 (biases) and Qwen3 (q/k norms) as llm-compressor writes them.
Oracles: transformers running the same checkpoint (compressed-tensors decompresses it and quantizes
activations as the scheme says), and the corpus's perplexity against the full-precision model."""

import numpy as np
import pytest
import torch

from quant_checkpoints import dequantized_copy, fp4_dense_copy
from ranks import needs_ranks
from trained_model import prompt_logprobs
from sageinfer import LLM

pytest.importorskip("llmcompressor")


def _recipes():
    """name: (recipe, calibrated on the corpus)"""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    def rtn(scheme):
        return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])

    def mixed(**targets):
        """A scheme per group of layers: {preset: [targets]}."""
        from compressed_tensors.quantization import preset_name_to_scheme
        return QuantizationModifier(config_groups={
            f"group_{i}": preset_name_to_scheme(preset, layers) for i, (preset, layers) in enumerate(targets.items())},
            ignore=["lm_head"])
    return {
        "w4a16": (rtn("W4A16"), False),
        "w4a16-asym": (rtn("W4A16_ASYM"), False),
        "w4a16-gptq-actorder": (GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], actorder="weight"),
                                True),
        "w8a16": (rtn("W8A16"), False),
        "w8a16-channel": (QuantizationModifier(config_groups={"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}},
            ignore=["lm_head"]), False),
        "w8a16-asym": (QuantizationModifier(config_groups={"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}}},
            ignore=["lm_head"]), False),
        "w8a16-gptq": (GPTQModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"], actorder="weight"), True),
        "nvfp4a16": (rtn("NVFP4A16"), False),
        "nvfp4": (rtn("NVFP4"), True),  # FP4 activations too (a calibrated global scale)
        "mxfp4a16": (rtn("MXFP4A16"), False),
        "fp8-dynamic": (rtn("FP8_DYNAMIC"), False),
        "fp8-static": (rtn("FP8"), True),
        "fp8-block": (rtn("FP8_BLOCK"), False),
        "int8-smoothquant-gptq": ([SmoothQuantModifier(smoothing_strength=0.8),
                                   GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])], True),
        # rotations fused into the weights (nothing to do at run time) / applied to inputs as the model runs
        "w4a16-spinquant": ([SpinQuantModifier(rotations=["R1", "R2"]), rtn("W4A16")], False),
        "w4a16-quip": ([QuIPModifier(targets="Linear", ignore=["lm_head"]), rtn("W4A16")], False),
        # mixed precision: FP8 attention, 4-bit MLP (llm-compressor writes two config groups)
        "mixed-fp8-attention-w4a16-mlp": (mixed(FP8_DYNAMIC=["re:.*self_attn.*_proj$"], W4A16=["re:.*mlp.*_proj$"]),
                                          False),
        "mixed-fp8-attention-w8a16-mlp": (mixed(FP8_DYNAMIC=["re:.*self_attn.*_proj$"], W8A16=["re:.*mlp.*_proj$"]),
                                          False),
        "mixed-split-qkv": (mixed(FP8_DYNAMIC=["re:.*q_proj$"], W4A16=["re:.*[kv]_proj$"]), False),
        # INT8 with one calibrated activation scale a layer (SmoothQuant's static form)
        "int8-static": ([SmoothQuantModifier(smoothing_strength=0.8), QuantizationModifier(config_groups={
            "group_0": {"targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                              "dynamic": False}}}, ignore=["lm_head"])], True),
        "fp8-dynamic-kv": (QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"],
                                                kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor",
                                                                 "dynamic": False, "symmetric": True}), True),
    }


SCHEMES = ["w4a16", "w4a16-asym", "w4a16-gptq-actorder", "w4a16-spinquant", "w8a16", "w8a16-channel", "w8a16-asym",
           "w8a16-gptq", "nvfp4a16", "nvfp4", "mxfp4a16", "fp8-dynamic", "fp8-static", "fp8-block",
           "int8-smoothquant-gptq", "int8-static", "mixed-fp8-attention-w4a16-mlp", "mixed-fp8-attention-w8a16-mlp"]


@pytest.fixture(scope="module")
def compressed(trained, tmp_path_factory):
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ids = trained
    width = 64
    chunks = [ids[i:i + width] for i in range(0, len(ids) - width + 1, width // 2)]
    calibration = Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * width] * len(chunks)})
    root = tmp_path_factory.mktemp("llm-compressor")
    out = {}
    for name, (recipe, calibrated) in _recipes().items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        data = dict(dataset=calibration, num_calibration_samples=len(chunks), max_seq_length=width) if calibrated else {}
        oneshot(model=model, recipe=recipe, **data)
        out[name] = str(root / name)
        model.save_pretrained(out[name], save_compressed=True)
        AutoTokenizer.from_pretrained(path).save_pretrained(out[name])
    return out


# FP8 blocks: transformers quantizes activations per 128 columns, our path only above 64 rows on a
# chip with a block GEMM (on the CPU never: 0.07 apart on a token here), so the oracle is the weights
# the checkpoint encodes. INT8: activations on either side of a rounding edge (tests/test_quantization.py).
# On a GPU, sums in another order move more of them.
_GPU = torch.cuda.is_available()
TOLERANCE = {"nvfp4a16": 1e-4, "nvfp4": 1e-4, "mxfp4a16": 1e-4, "w8a16": 1e-4, "w8a16-channel": 1e-4, "w8a16-asym": 1e-4, "w8a16-gptq": 1e-4, "w4a16": 1e-4, "w4a16-asym": 1e-4, "w4a16-gptq-actorder": 1e-4, "w4a16-spinquant": 1e-4, "fp8-dynamic": 5e-2 if _GPU else 1e-4,
             "fp8-static": 5e-2 if _GPU else 1e-4, "fp8-block": 5e-2 if _GPU else 1e-4,
             "int8-smoothquant-gptq": 5e-2 if _GPU else 1e-2, "int8-static": 5e-2 if _GPU else 1e-2,
             "mixed-fp8-attention-w4a16-mlp": 5e-2 if _GPU else 1e-4,
             "mixed-fp8-attention-w8a16-mlp": 5e-2 if _GPU else 1e-4}


@pytest.mark.parametrize("name", SCHEMES)
def test_llm_compressor_checkpoint_matches_transformers(trained, compressed, name, tmp_path):
    from oracle import hf_logits
    ids = trained[1][:40]
    ours = prompt_logprobs(compressed[name], ids)
    # The oracle for FP8 blocks and FP4: the weights the checkpoint encodes (transformers cannot run FP4
    # files in float32; FP4 activations run in 16 bits here, as on every chip without FP4 matmuls)
    if name == "fp8-block":
        oracle = dequantized_copy(compressed[name], str(tmp_path / "encoded"), block=128)
    elif name.startswith(("nvfp4", "mxfp4")):
        oracle = fp4_dense_copy(compressed[name], str(tmp_path / "encoded"))
    else:
        oracle = compressed[name]
    ref = hf_logits(oracle, ids).log_softmax(-1)
    np.testing.assert_allclose(ours, [ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                               atol=TOLERANCE[name])


def test_perplexity_of_each_scheme_against_full_precision(trained, compressed):
    """The corpus's perplexity through each checkpoint over the trained model's (2.34). Measured on the
    CPU: W4A16 round-to-nearest +11.6% (symmetric) / +8.6% (asymmetric), GPTQ in act-order +6.4%,
    after SpinQuant's rotations +16.1% (rotations do not help a model this small); W8A16 in groups of
    128 +0.007%, per channel +0.013%, asymmetric in groups of 128 -0.03%, by GPTQ +0.03%; NVFP4A16 +8.4%
    (NVFP4 the same: its FP4 activations run in 16 bits here), MXFP4A16 +10.6%;
    FP8 dynamic +1.2%, static +1.3%, blocks +0.4%; INT8 SmoothQuant + GPTQ +0.2%, SmoothQuant with
    static activation scales +0.2%; FP8 attention with a 4-bit MLP +5.5%, with an 8-bit one +0.56%.
    The increase is the
    scheme's on a model this small (groups of 128 are whole rows at hidden size 128), not the engine's:
    the test above finds our logprobs equal to transformers' on the same checkpoints."""
    path, ids = trained

    def perplexity(p):
        return float(np.exp(-prompt_logprobs(p, ids).mean()))

    base = perplexity(path)
    assert 1.5 < base < 4, base  # learned something, not memorised
    ratios = {name: perplexity(compressed[name]) / base for name in SCHEMES}
    assert all(ratios[name] < BOUNDS[name] for name in SCHEMES), ratios
    assert ratios["w4a16-gptq-actorder"] < ratios["w4a16"], ratios  # calibration reached GPTQ


BOUNDS = {"nvfp4a16": 1.1, "nvfp4": 1.1, "mxfp4a16": 1.15, "w8a16": 1.002, "w8a16-channel": 1.002, "w8a16-asym": 1.002, "w8a16-gptq": 1.002, "w4a16": 1.15, "w4a16-asym": 1.12, "w4a16-gptq-actorder": 1.09, "w4a16-spinquant": 1.2, "fp8-dynamic": 1.02, "fp8-static": 1.02,
          "fp8-block": 1.02, "int8-smoothquant-gptq": 1.01, "int8-static": 1.01, "mixed-fp8-attention-w4a16-mlp": 1.08,
          "mixed-fp8-attention-w8a16-mlp": 1.01}


def test_calibrated_kv_cache_scales_reach_an_fp8_cache(trained, compressed):
    """FP8 weights with a calibrated FP8 KV scheme (k_scale / v_scale a layer in the checkpoint): it
    loads with either cache; an FP8 cache divides by the layer's larger scale (the kernels take one),
    a bf16 cache ignores them, as vLLM. Measured on the CPU: the corpus's logprobs 0.027 apart on
    average (0.19 at most) from the same weights over a full-precision cache, perplexity +0.3%."""
    from safetensors import safe_open
    path = compressed["fp8-dynamic-kv"]
    ids = trained[1]
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        expected = [max(float(f.get_tensor(f"model.layers.{i}.self_attn.{w}_scale")) for w in "kv") for i in range(2)]
    assert all(0 < e < 0.5 for e in expected), expected  # calibrated, not the default 1.0
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False, kv_cache_dtype="fp8",
              attention_backend="torch_ref")
    assert [c.fp8_scale for c in llm.engine.runner.kv_caches] == pytest.approx(expected)
    llm.engine.shutdown()
    whole, fp8 = prompt_logprobs(path, ids), prompt_logprobs(path, ids, kv_cache_dtype="fp8")
    assert np.abs(fp8 - whole).mean() < 0.05 and np.exp(whole.mean() - fp8.mean()) < 1.01


def test_older_fp8_checkpoints_name_their_kv_scales_otherwise(compressed, tmp_path):
    """The first FP8 checkpoints held the scales as k_proj / v_proj output scales, a later format as
    one self_attn.kv_scale: the same scales reach the cache."""
    import shutil

    from safetensors.torch import load_file, save_file
    path = compressed["fp8-dynamic-kv"]
    tensors = load_file(f"{path}/model.safetensors")
    expected = [max(float(tensors[f"model.layers.{i}.self_attn.{w}_scale"]) for w in "kv") for i in range(2)]
    for style in ("output_scale", "kv_scale"):
        renamed = {}
        for name, t in tensors.items():
            head, _, last = name.rpartition(".")
            if last in ("k_scale", "v_scale"):
                name = f"{head}.{last[0]}_proj.output_scale" if style == "output_scale" else f"{head}.kv_scale"
                t = torch.maximum(t, renamed.get(name, t))
            renamed[name] = t
        dst = str(tmp_path / style)
        shutil.copytree(path, dst)
        save_file(renamed, f"{dst}/model.safetensors")
        llm = LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False, kv_cache_dtype="fp8")
        assert [c.fp8_scale for c in llm.engine.runner.kv_caches] == pytest.approx(expected), style
        llm.engine.shutdown()


def test_rotations_applied_at_run_time_are_refused_at_start(compressed):
    """QuIP's online Hadamard transforms act on each layer's input as the model runs: without them the
    answer would be wrong, so the checkpoint is refused before any weight loads, naming why."""
    with pytest.raises(ValueError, match="transform 'v' applied at run time .location 'input'.*supported"):
        LLM(compressed["w4a16-quip"], dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_a_mixed_precision_checkpoint_gives_each_layer_its_group(compressed):
    """Two config groups: attention's projections FP8 W8A8, the MLP's 4-bit (its logprobs equal
    transformers' above); a merged layer whose parts fall in different groups is refused at start."""
    llm = LLM(compressed["mixed-fp8-attention-w4a16-mlp"], dtype="float32", num_gpu_blocks_override=128,
              show_progress=False)
    layer = llm.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.gate_up_proj.weight_packed.dtype == torch.int32 and not hasattr(layer.mlp.gate_up_proj, "weight")
    assert llm.engine.runner.model.lm_head.weight.dtype == torch.float32  # ignored
    llm.engine.shutdown()
    dummy = LLM(compressed["mixed-fp8-attention-w4a16-mlp"], dtype="float32", num_gpu_blocks_override=128,
                show_progress=False, load_format="dummy")  # benchmarks: random weights, each group's scheme
    layer = dummy.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn and hasattr(layer.mlp.down_proj, "weight_packed")
    dummy.engine.shutdown()
    with pytest.raises(ValueError, match="with different schemes; they are one layer here"):
        LLM(compressed["mixed-split-qkv"], dtype="float32", num_gpu_blocks_override=128, show_progress=False)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "FP8_DYNAMIC"])
def test_other_architectures_as_llm_compressor_writes_them(tmp_path, arch, scheme):
    """Qwen2's q/k/v biases and Qwen3's q/k norms beside quantized projections (random weights,
    hidden size 128 for the groups of 128): logprobs equal transformers' on the same file."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from oracle import hf_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sageinfer.models.tiny import build_tiny_model
    src = build_tiny_model(str(tmp_path / "src"), arch, hidden_size=128, num_heads=4, num_kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    path = str(tmp_path / "quantized")
    model.save_pretrained(path, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    ids = list(range(3, 43))
    ref = hf_logits(path, ids).log_softmax(-1)
    np.testing.assert_allclose(prompt_logprobs(path, ids), [ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                               atol=5e-2 if _GPU else 1e-4)


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W4A16", "W8A16", "NVFP4A16", "mixed"])
def test_a_quantized_lm_head_runs_as_transformers_runs_it(trained, tmp_path, scheme):
    """A recipe that leaves lm_head out of its ignore list quantizes it too (in a mixed recipe, the
    group that names it): the head then runs its scheme's method over the vocabulary rows (logits in
    float32), equal to transformers on the files (NVFP4A16: on the weights they encode)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from oracle import hf_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sageinfer.layers.embedding import QuantizedLMHead
    model = AutoModelForCausalLM.from_pretrained(trained[0], dtype=torch.float32)
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=[]) if scheme != "mixed" else \
        QuantizationModifier(config_groups={
            "group_0": preset_name_to_scheme("FP8_DYNAMIC", ["re:.*self_attn.*_proj$"]),
            "group_1": preset_name_to_scheme("W4A16", ["re:.*mlp.*_proj$", "lm_head"])})
    oneshot(model=model, recipe=recipe)
    path = str(tmp_path / "q")
    model.save_pretrained(path, save_compressed=True)
    AutoTokenizer.from_pretrained(trained[0]).save_pretrained(path)
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    head = llm.engine.runner.model.lm_head
    method = {"FP8_DYNAMIC": "W8A8Method", "W4A16": "W4A16Method", "W8A16": "W8A16Method", "NVFP4A16": "Fp4Method",
              "mixed": "W4A16Method"}[scheme]
    assert isinstance(head, QuantizedLMHead) and type(head.quant).__name__ == method
    llm.engine.shutdown()
    ids = trained[1][:40]
    oracle = fp4_dense_copy(path, str(tmp_path / "encoded")) if scheme == "NVFP4A16" else path
    ref = hf_logits(oracle, ids).log_softmax(-1)
    np.testing.assert_allclose(prompt_logprobs(path, ids), [ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                               atol=5e-2 if _GPU and scheme.startswith("FP8") else 1e-4)


@needs_ranks(2)
@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16"])
def test_fp4_at_two_ranks_gives_one_ranks_logprobs(trained, compressed, name):
    """FP4 held at four bits split over two ranks (row-parallel layers: half the input columns, their
    scale bytes and groups; each part of a merged layer its own global scale): tp=1's logprobs."""
    ids = trained[1][:40]
    one, two = (prompt_logprobs(compressed[name], ids, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one, two, atol=1e-4)
