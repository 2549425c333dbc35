"""Quantized weights from their checkpoint formats: FP8 and INT8 W8A8 (compressed-tensors, as
llm-compressor writes them, and FP8 quantized at load time), W4A16 (compressed-tensors
pack-quantized, GPTQ, AWQ) and block-quantized FP8. Oracles: transformers running the same
checkpoint through compressed-tensors where it can (it quantizes the activations as the scheme
says), else transformers running the weights the checkpoint encodes."""

import os

import numpy as np
import pytest
import torch

from quant_checkpoints import dequantized_copy, write_compressed_tensors
from ranks import needs_ranks
from sageinfer import LLM, SamplingParams
from sageinfer.layers.quantization.config import parse_quant_config
from sageinfer.layers.quantization.w8a8 import W8A8Method, dequantized_matmul, quantize_rows
from sageinfer.layers.quantization import w8a8
from sageinfer.platforms import get_platform

PROMPT = np.random.default_rng(0).integers(3, 500, size=30).tolist()


def _prompt_logprobs(path, **options):
    # The reference attention everywhere: on a GPU Triton's float32 dots are tf32 (1e-4 noise), and
    # these tests measure the quantized linear layers.
    options.setdefault("attention_backend", "torch_ref")
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False, **options)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0),
                       use_tqdm=False)[0]
    llm.engine.shutdown()
    return np.array([out.prompt_logprobs[i][PROMPT[i]].logprob for i in range(1, len(PROMPT))]), \
        out.outputs[0].token_ids


@pytest.fixture(scope="module")
def checkpoints(llama_dir, tmp_path_factory):
    """The tiny llama as compressed-tensors checkpoints of each scheme."""
    root = tmp_path_factory.mktemp("quantized")
    cases = {"fp8-channel": ("fp8", "channel", True), "fp8-tensor": ("fp8", "tensor", True),
             "fp8-static": ("fp8", "tensor", False), "int8-channel": ("int8", "channel", True)}
    return {name: write_compressed_tensors(llama_dir, str(root / name), *args) for name, args in cases.items()}


# INT8: the same layer output exactly on the same input, but float noise of 1e-6 upstream (attention
# kernels differ) can move an activation across a rounding edge, one step of 1/127.5 of its row's
# largest value: up to 6e-3 in a logprob here, hence the looser bound. On a GPU the matmuls sum in
# another order than the CPU oracle, so more activations cross edges (INT8 up to 0.021 measured on an
# H100), FP8 ones too (a step is 1/8 of a value). A wrongly loaded layer moves logprobs by whole units.
_FP8 = 5e-2 if torch.cuda.is_available() else 1e-4
_INT8 = 5e-2 if torch.cuda.is_available() else 1e-2


@pytest.mark.parametrize("name, tolerance", [("fp8-channel", _FP8), ("fp8-tensor", _FP8), ("fp8-static", _FP8),
                                             ("int8-channel", _INT8)])
def test_compressed_tensors_checkpoint_matches_transformers(checkpoints, name, tolerance):
    pytest.importorskip("compressed_tensors")
    from oracle import hf_logits
    ours, _ = _prompt_logprobs(checkpoints[name])
    ref = hf_logits(checkpoints[name], PROMPT).log_softmax(-1)
    theirs = np.array([ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))])
    np.testing.assert_allclose(ours, theirs, atol=tolerance)


def test_fp8_at_load_time_equals_the_per_channel_checkpoint(checkpoints, tmp_path):
    """Quantizing the checkpoint's own dequantized weights per channel gives back its 8-bit weights
    and scales: the same model, so loading the format and quantizing at load time agree exactly (on
    the CPU; on a GPU the scales are computed there, and an FP8 activation may round the other way)."""
    dense = dequantized_copy(checkpoints["fp8-channel"], str(tmp_path / "dense"))
    from_checkpoint = _prompt_logprobs(checkpoints["fp8-channel"])
    at_load = _prompt_logprobs(dense, quantization="fp8")
    np.testing.assert_allclose(from_checkpoint[0], at_load[0], atol=_FP8 if torch.cuda.is_available() else 0)
    assert from_checkpoint[1] == at_load[1]


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_quantization_at_load_time_never_holds_the_whole_model_in_full_precision(llama_dir, monkeypatch,
                                                                                quantization):
    """A layer quantized at load time takes memory for its full-precision weight only as its rows arrive, and
    converts as soon as they are all in: after every checkpoint tensor, at most the layers being filled hold
    one (loading the whole model first would need it all in full precision: a 32B model in bf16 on a
    48 GB card, where FP8 fits)."""
    import sageinfer.models.loader as loader
    from sageinfer.layers.linear import Linear
    layers, held = [], []
    build = Linear.__init__

    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        layers.append(self)
    monkeypatch.setattr(Linear, "__init__", init)
    read = loader.iterate_safetensors

    def stream(*args, **kwargs):
        for item in read(*args, **kwargs):
            yield item
            held.append(sum(1 for layer in layers if layer.quant is not None and not layer.weight.is_meta
                            and layer.weight.dtype == torch.float32))
    monkeypatch.setattr(loader, "iterate_safetensors", stream)
    _prompt_logprobs(llama_dir, quantization=quantization)
    quantized = [layer for layer in layers if layer.quant is not None]
    assert len(quantized) > 4 and all(layer.weight.dtype != torch.float32 for layer in quantized)
    assert not any(p.is_meta for layer in layers for p in layer.parameters())  # no placeholder left registered
    assert held and max(held) <= 2, held


def test_int8_at_load_time_equals_the_per_channel_checkpoint(checkpoints, tmp_path):
    """quantization="int8" (INT8 W8A8 for chips without FP8 matmuls): quantizing the INT8 checkpoint's own
    dequantized weights per channel gives back its integers and scales, so the two agree exactly on the CPU."""
    dense = dequantized_copy(checkpoints["int8-channel"], str(tmp_path / "dense"))
    from_checkpoint = _prompt_logprobs(checkpoints["int8-channel"])
    at_load = _prompt_logprobs(dense, quantization="int8")
    np.testing.assert_allclose(from_checkpoint[0], at_load[0], atol=_INT8 if torch.cuda.is_available() else 0)
    assert from_checkpoint[1] == at_load[1]
    llm = LLM(dense, dtype="float32", num_gpu_blocks_override=128, show_progress=False, quantization="int8")
    assert llm.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    llm.engine.shutdown()


# INT8 W8A8: tests/test_ops_gemv.py
@pytest.mark.parametrize("name", ["fp8-channel", "fp8-block", "w4a16-group-asym", "gptq-8bit"])
def test_one_row_reads_quantized_weights_as_the_model_they_encode(checkpoints, llama_dir, tmp_path, monkeypatch,
                                                                    request, name):
    """At one row the 8- and 4-bit layers go through the skinny kernel with their scales (and zero
    points; 16-bit activations, the norm, activation and residual folded in): a one-token prompt and
    its decode steps equal the dequantized model's, which takes the same kernel with whole weights.
    A W4A16 model's gate_up matmul hands out silu(gate) * up (its down projection takes a plain
    input) where its dequantized copy, forced the other way (SAGEINFER_ONE_ROW_ACTIVATE=0), forms the
    activation in down: the same tokens either way. Group-scaled 8-bit weights (block FP8, GPTQ 8-bit)
    take ops/gemv_grouped.py's kernel."""
    from sageinfer.layers import linear as linear_layers
    from sageinfer.ops import gemv as gemv_module
    from sageinfer.ops import gemv_grouped
    grouped_calls, grouped_kernel = [], gemv_grouped.grouped_gemv
    monkeypatch.setattr(gemv_grouped, "grouped_gemv", lambda *a: grouped_calls.append(a) or grouped_kernel(*a))
    calls, original = [], gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: (calls.append(k), original(*a, **k))[1])
    sampling = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0)
    outs = {}
    if name == "fp8-block":
        from quant_checkpoints import write_fp8_blocks
        quantized, dense = write_fp8_blocks(llama_dir, str(tmp_path / "fp8-blocks"))
    elif name.startswith("w4a16"):
        quantized, dense = request.getfixturevalue("w4a16")[name.removeprefix("w4a16-")]
    elif name == "gptq-8bit":
        from quant_checkpoints import write_gptq_8bit
        quantized, dense = write_gptq_8bit(llama_dir, str(tmp_path / "gptq-8bit"))
    else:
        quantized, dense = checkpoints[name], dequantized_copy(checkpoints[name], str(tmp_path / "dense"))
    for which, path in (("quantized", quantized), ("dense", dense)):
        activate = which == "quantized" and name.startswith("w4a16")
        monkeypatch.setattr(linear_layers, "ONE_ROW_ACTIVATE", None if which == "quantized" else False)
        calls.clear()
        llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, attention_backend="triton", enforce_eager=True,
                  show_progress=False)
        out = llm.generate({"prompt_token_ids": PROMPT[:1]}, sampling, use_tqdm=False)[0].outputs[0]
        outs[which] = (out.token_ids, [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
        llm.engine.shutdown()
        if which == "quantized":
            scaled = [k for k in calls if k.get("weight_scale") is not None]
            assert any("norm_weight" in k for k in scaled) and any(k.get("residual") is not None for k in scaled)
        if activate:
            assert any(k.get("activate") for k in calls) and not any(k.get("gated") for k in calls)
        else:
            assert any(k.get("gated") for k in calls) and not any(k.get("activate") for k in calls)
    assert outs["quantized"][0] == outs["dense"][0]
    np.testing.assert_allclose(outs["quantized"][1], outs["dense"][1], atol=1e-4)
    assert bool(grouped_calls) == (name in ("fp8-block", "gptq-8bit"))


def test_layers_hold_8_bit_weights_and_the_ignored_stay_whole(checkpoints, llama_dir, tmp_path):
    llm = LLM(checkpoints["int8-channel"], dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    layer = llm.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.int8 and layer.mlp.down_proj.weight.dtype == torch.int8
    assert layer.self_attn.qkv_proj.weight_scale.shape == (layer.self_attn.qkv_proj.weight.shape[0],)
    # A checkpoint that keeps layer 0's MLP in full precision (names, fnmatch and re: patterns).
    ignored = write_compressed_tensors(
        llama_dir, str(tmp_path / "ignored"), "fp8",
        ignore=("lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"),
        config_ignore=("lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_*",
                       "re:.*layers\\.0\\.mlp\\.down_proj"))
    mixed = LLM(ignored, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    layers = mixed.engine.runner.model.model.layers
    assert layers[0].mlp.gate_up_proj.quant is None and layers[0].mlp.gate_up_proj.weight.dtype == torch.float32
    assert layers[0].mlp.down_proj.quant is None and layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert layers[1].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert mixed.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    half = write_compressed_tensors(llama_dir, str(tmp_path / "half"), "fp8",
                                    ignore=("lm_head", "model.layers.0.self_attn.q_proj"))
    with pytest.raises(ValueError, match="not all"):
        LLM(half, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_int8_checkpoint_on_the_portable_kernel_scores_as_the_library_gemm(checkpoints, monkeypatch):
    """A chip without a library INT8 GEMM runs the Triton INT8 kernel (ops/int8_matmul.py) in every W8A8
    layer (forced here, kernels through the platform's Triton choice), and so does a chip that prefers it
    to its library GEMM (Hopper): the model scores the prompt as
    with torch._int_mm (itself checked against transformers above); the int32 sums are exact, so only
    float rounding of the scaling may differ."""
    platform_class = type(get_platform())  # the CPU's, or the GPU's when the suite runs there
    runs = {}
    kernel, library = w8a8.int8_matmul, platform_class.int8_matmul
    # "preferred": a library GEMM is there but the platform prefers the kernel (Hopper), in its fast tiles
    for path in ("library", "triton", "preferred"):
        seen = []

        def int8_matmul(self, xq, wq, path=path, seen=seen):
            seen.append(path)
            return library(self, xq, wq) if path != "triton" else None  # None: no library GEMM here
        monkeypatch.setattr(platform_class, "int8_matmul", int8_matmul)
        monkeypatch.setattr(platform_class, "portable_int8_kernel", True)  # (NVIDIA's platform keeps cuBLAS)
        monkeypatch.setattr(platform_class, "prefers_int8_kernel", lambda self, path=path: path == "preferred")
        kernel_calls = []
        monkeypatch.setattr(w8a8, "int8_matmul", lambda *a, calls=kernel_calls, **k: calls.append(a[-1]) or kernel(*a, **k))
        runs[path] = _prompt_logprobs(checkpoints["int8-channel"], attention_backend="triton", enforce_eager=True)
        assert bool(seen) == (path != "preferred") and bool(kernel_calls) == (path != "library")
        # the preferred kernel launches with the tiles for its row count
        assert all(isinstance(cfg, dict) == (path == "preferred") for cfg in kernel_calls)
    for path in ("triton", "preferred"):
        np.testing.assert_allclose(runs[path][0], runs["library"][0], atol=1e-5)
        assert runs[path][1] == runs["library"][1]


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_weights_quantized_in_row_chunks_equal_the_whole_weight_at_once(scheme, monkeypatch):
    """Load-time quantization goes a few rows at a time (bounded temporaries); every value and scale is the one
    the whole weight at once gives, whether the chunks divide the rows or not."""
    torch.manual_seed(1)
    w = torch.randn(37, 64) * torch.rand(37, 1) * 5
    whole_q, whole_scale = quantize_rows(w, scheme)
    for elements in (64 * 5, 64 * 37, 1):  # 5 rows a chunk (the last one 2), all at once, one row a chunk
        monkeypatch.setattr(w8a8, "WEIGHT_CHUNK_ELEMENTS", elements)
        q, scale = w8a8.quantize_weight_rows(w, scheme)
        assert q.dtype == whole_q.dtype and torch.equal(q.view(torch.uint8), whole_q.view(torch.uint8))
        assert torch.equal(scale, whole_scale)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_the_8_bit_matmul_is_its_dequantized_reference(scheme):
    """On a GPU the 8-bit GEMMs themselves (bf16 out for FP8), on the CPU the reference path."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.bfloat16 if device == "cuda" else torch.float32
    x, w = torch.randn(7, 128, device=device), torch.randn(96, 128, device=device) * torch.rand(96, 1, device=device) * 3
    wq, ws = quantize_rows(w, scheme)
    xq, xs = quantize_rows(x, scheme, activations=True)
    method = W8A8Method(parse_quant_config(None, "fp8") if scheme == "fp8" else
                        parse_quant_config(_ct_config("int", "channel", True), None))
    got = method._matmul(xq, xs, wq, ws.view(-1), out, get_platform()).float()
    want = dequantized_matmul(xq, xs, wq, ws.view(-1), out).float()
    torch.testing.assert_close(got, want, rtol=1e-5 if out == torch.float32 else 1e-2, atol=1e-4 if out == torch.float32 else 2e-2)
    # and close to the full-precision product (8-bit rounding of both sides)
    rel = (got - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < (0.05 if scheme == "fp8" else 0.02), rel


def _fp4_config(fmt, strategy, group_size):
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"], "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": strategy,
                                           "group_size": group_size}}}}


def test_which_schemes_take_fp8_values():
    """What takes FP8 values in its kernels: FP8 weights (per channel, per tensor, in blocks, at load
    time) and NVFP4's FP8 group scales; not INT8, integer weight-only or MXFP4 (E8M0 scales)."""
    needs = lambda raw, option=None: parse_quant_config(raw, option).needs_fp8()  # noqa: E731
    dequantizes = lambda raw: parse_quant_config(raw, None).dequantizes_without_fp8()  # noqa: E731
    assert needs(_ct_config("float", "channel", True)) and needs(None, "fp8")
    assert needs({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"})
    assert needs(_fp4_config("nvfp4-pack-quantized", "tensor_group", 16))
    # what runs multiplied out to 16 bits there: FP8 weights, not NVFP4's packed codes
    assert dequantizes(_ct_config("float", "channel", True))
    assert dequantizes({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"})
    assert not dequantizes(_fp4_config("nvfp4-pack-quantized", "tensor_group", 16))
    assert not needs(_fp4_config("mxfp4-pack-quantized", "group", 32))
    assert not needs(_ct_config("int", "channel", True))
    assert not needs({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    mixed = _ct_config("int", "channel", True)
    mixed["config_groups"] = {"int8": {**mixed["config_groups"]["g"], "targets": ["re:.*mlp.*"]},
                              "fp8": {**_ct_config("float", "channel", True)["config_groups"]["g"],
                                      "targets": ["re:.*self_attn.*"]}}
    assert needs(mixed)


def test_a_device_without_fp8_runs_fp8_weights_multiplied_out_and_refuses_the_rest(checkpoints, llama_dir, tmp_path,
                                                                                     monkeypatch, caplog):
    """An A100 has no FP8 e4m3 (Triton refuses the type in a kernel): FP8 and block FP8 weights are
    multiplied out to 16 bits after loading (transformers on the dequantized files is the oracle: no
    activation is quantized then); NVFP4 and an FP8 cache are refused at start, naming what runs there."""
    import json
    import shutil
    from oracle import hf_logits
    from quant_checkpoints import write_fp8_blocks
    monkeypatch.setattr(type(get_platform()), "supports_fp8", lambda self: False)
    blocks, blocks_dense = write_fp8_blocks(llama_dir, str(tmp_path / "fp8-blocks"))
    for quantized, dense in ((checkpoints["fp8-channel"], dequantized_copy(checkpoints["fp8-channel"],
                                                                           str(tmp_path / "dense"))),
                             (blocks, blocks_dense)):
        llm = LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False,
                  attention_backend="torch_ref")
        layers = [m for m in llm.engine.runner.model.modules() if hasattr(m, "quant")]
        assert layers and all(m.quant is None and m.weight.dtype == torch.float32 for m in layers)
        out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        llm.engine.shutdown()
        ours = [out.prompt_logprobs[i][PROMPT[i]].logprob for i in range(1, len(PROMPT))]
        ref = hf_logits(dense, PROMPT).log_softmax(-1)
        np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)
    assert "multiplied out" in caplog.text
    nvfp4 = str(tmp_path / "nvfp4")
    shutil.copytree(llama_dir, nvfp4)
    with open(f"{nvfp4}/config.json") as f:
        config = json.load(f)
    config["quantization_config"] = _fp4_config("nvfp4-pack-quantized", "tensor_group", 16)
    with open(f"{nvfp4}/config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="needs FP8 .* INT8 W8A8 and integer weight-only checkpoints"):
        LLM(nvfp4, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    with pytest.raises(ValueError, match="use int8"):
        LLM(checkpoints["int8-channel"], dtype="float32", kv_cache_dtype="fp8", num_gpu_blocks_override=128,
            show_progress=False)
    with pytest.raises(ValueError, match="quantization='fp8' needs FP8 matmuls.*quantization='int8'"):
        LLM(llama_dir, dtype="float32", quantization="fp8", num_gpu_blocks_override=128, show_progress=False)
    llm = LLM(llama_dir, dtype="float32", quantization="int8", num_gpu_blocks_override=128, show_progress=False)
    assert llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.int8  # what runs there
    llm.engine.shutdown()


def test_nvidia_gpus_have_fp8_from_ada_on(monkeypatch):
    from sageinfer.platforms.cuda import CudaPlatform
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, fp8 in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert CudaPlatform().supports_fp8() == fp8, capability


def _ct_config(kind, strategy, dynamic, bits=8, symmetric=True, act_bits=8):
    return {"quant_method": "compressed-tensors", "ignore": ["lm_head"], "config_groups": {"g": {
        "targets": ["Linear"],
        "weights": {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy},
        "input_activations": {"num_bits": act_bits, "type": kind, "symmetric": True, "dynamic": dynamic,
                              "strategy": "token" if dynamic else "tensor"}}}}


def _with_weights(raw, **weights):
    raw["config_groups"]["g"]["weights"].update(weights)
    return raw


def _with_4_bit_weights(**weights):
    raw = _with_weights(_ct_config("int", "group", False, bits=4), **weights)
    raw["config_groups"]["g"]["input_activations"] = None
    return raw


@pytest.mark.parametrize("raw, option, says", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, None, "AWQ version 'gemv'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, None, "gptq with 3 bits"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, None, "awq with 8 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, None, "group_size 100"),
    ({**_with_weights(_with_4_bit_weights(), type="float", strategy="group", group_size=16),
      "format": "mxfp4-pack-quantized"}, None, "FP4 weights in format 'mxfp4-pack-quantized'"),
    ({"quant_method": "hqq"}, None, "quant_method 'hqq'"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_has_fp16_weight": True}, None,
     "bitsandbytes with load_in_4bit None, load_in_8bit True \\(16-bit weights kept: True\\)"),
    (_ct_config("int", "group", True, bits=4), None, "int 4 bit"),
    (_ct_config("int", "channel", True, symmetric=False), None, "asymmetric W8A8"),
    (_ct_config("int", "tensor", True), None, "strategy 'tensor'"),
    (None, "gptq", "full-precision checkpoint"),
    (_ct_config("float", "channel", True), "fp8", "does not match"),
    (_with_weights(_ct_config("float", "block", True), block_structure=[128, 64]), None, r"blocks \[128, 64\]"),
    (_with_weights(_ct_config("float", "block", False), block_structure=[128, 128]), None, "dynamic False"),
    (_with_4_bit_weights(strategy="channel", actorder="group"), None, "actorder 'group'"),
    (_with_4_bit_weights(strategy="group", group_size=128, actorder="random"), None, "actorder 'random'"),
    ({**_ct_config("float", "channel", True), "sparsity_config": {"format": "sparse-24-bitmask"}}, None,
     "sparsity format 'sparse-24-bitmask'"),
    ({**_ct_config("float", "channel", True), "transform_config": {"config_groups": {"u": {"apply": [
        {"location": "weight_input"}, {"location": "output"}]}}}}, None, "transform 'u' applied at run time"),
])
def test_what_is_not_supported_is_refused_at_start_naming_what_is(raw, option, says):
    with pytest.raises(ValueError, match=says) as info:
        parse_quant_config(raw, option)
    assert "supported" in str(info.value) or "does not match" in str(info.value)


def test_vllm_names_of_a_checkpoints_method_are_accepted():
    """vLLM's users pass its kernels' names (gptq_marlin, awq_marlin) as the method of GPTQ and AWQ
    checkpoints: the same config; another method's name still does not match."""
    from sageinfer.config import EngineConfig
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128}
    assert parse_quant_config(gptq, "gptq_marlin") == parse_quant_config(gptq, None)
    assert parse_quant_config(awq, "awq_marlin") == parse_quant_config(awq, "awq")
    with pytest.raises(ValueError, match="does not match"):
        parse_quant_config(gptq, "awq_marlin")
    assert EngineConfig(model="m", quantization="gptq_marlin").quantization == "gptq_marlin"
    with pytest.raises(ValueError, match="quantization='hqq' is not supported"):
        EngineConfig(model="m", quantization="hqq")


def test_dummy_weights_with_a_quantization_method(llama_dir):
    llm = LLM(llama_dir, dtype="float32", load_format="dummy", quantization="fp8", num_gpu_blocks_override=128,
              show_progress=False)
    assert llm.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="supported"):
        LLM(llama_dir, quantization="awq", show_progress=False)


@needs_ranks(2)
def test_tp2_runs_the_quantized_checkpoint_as_tp1(checkpoints):
    """A static input scale quantizes each rank's part of a row-parallel input as the whole: the same
    numbers. Dynamic per-token scales come from each rank's part (as in vLLM): other rounding, so
    those agree only to within the scheme's noise."""
    one, two = (_prompt_logprobs(checkpoints["fp8-static"], tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one[0], two[0], atol=1e-4)
    assert one[1] == two[1]
    one, two = (_prompt_logprobs(checkpoints["fp8-channel"], tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one[0], two[0], atol=0.2)


def test_perplexity_of_a_trained_model_barely_moves(tmp_path):
    """A tiny llama trained 25 steps on the tokenizer's corpus (perplexity about 2.5 there): measured
    increases FP8 +0.8% (per channel and per tensor, and quantized at load), INT8 +0.01% (per channel, and
    quantized at load); bounds 2% and 1%."""
    from trained_model import build_trained_model, corpus_token_ids
    dense = build_trained_model(str(tmp_path / "trained"), steps=25, hidden_size=64)
    ids = corpus_token_ids(dense)

    def perplexity(path, **options):
        llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False, **options)
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        return float(np.exp(-np.mean([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])))

    base = perplexity(dense)
    assert 1.5 < base < 4, base  # learned something, not memorised
    ratios = {"fp8 at load": perplexity(dense, quantization="fp8") / base,
              "int8 at load": perplexity(dense, quantization="int8") / base}
    for scheme, strategy in (("fp8", "channel"), ("fp8", "tensor"), ("int8", "channel")):
        path = write_compressed_tensors(dense, str(tmp_path / f"{scheme}-{strategy}"), scheme, strategy)
        ratios[f"{scheme} {strategy}"] = perplexity(path) / base
    assert all(r < (1.01 if name.startswith("int8") else 1.02) for name, r in ratios.items()), ratios


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    from quant_checkpoints import write_w4a16
    from sageinfer.models.tiny import build_tiny_model
    root = tmp_path_factory.mktemp("w4a16")
    src = build_tiny_model(str(root / "src"), "llama", hidden_size=128, num_heads=4, num_kv_heads=2)
    return {"group-sym": write_w4a16(src, str(root / "group-sym"), 32, True),
            "group-asym": write_w4a16(src, str(root / "group-asym"), 64, False),
            "channel-sym": write_w4a16(src, str(root / "channel-sym"), None, True)}


@pytest.mark.parametrize("name", ["group-sym", "group-asym", "channel-sym"])
def test_w4a16_checkpoint_runs_the_weights_it_encodes(w4a16, name):
    """The checkpoint as compressed-tensors writes it, against transformers running the weights it
    encodes (4-bit weights, full-precision activations: equal up to float rounding)."""
    from oracle import hf_logits
    quantized, dense = w4a16[name]
    ours, _ = _prompt_logprobs(quantized)
    ref = hf_logits(dense, PROMPT).log_softmax(-1)
    np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)
    llm = LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    proj = llm.engine.runner.model.model.layers[0].mlp.gate_up_proj
    assert proj.weight_packed.dtype == torch.int32 and proj.weight_packed.shape[1] * 8 == 128
    # symmetric weights hold no zero points (an int32 a group would be a 16th of the 4-bit weight's bytes)
    assert hasattr(proj, "weight_zero_point") == name.endswith("asym")
    if name == "group-sym":  # transformers itself, through compressed-tensors, on the packed checkpoint
        ref = hf_logits(quantized, PROMPT).log_softmax(-1)
        np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)


@needs_ranks(2)
def test_tp2_w4a16_equals_tp1(w4a16):
    quantized, _ = w4a16["group-asym"]
    one, two = (_prompt_logprobs(quantized, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one[0], two[0], atol=1e-4)
    assert one[1] == two[1]


def test_w4a16_with_dummy_weights(w4a16):
    quantized, _ = w4a16["group-sym"]
    llm = LLM(quantized, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    proj = llm.engine.runner.model.model.layers[0].self_attn.o_proj
    assert proj.weight_packed.dtype == torch.int32 and not hasattr(proj, "weight")
    assert not hasattr(proj, "weight_zero_point")  # quantized symmetrically at load
    assert len(llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_dummy_weights_keep_a_layer_the_config_ignores_whole(checkpoints, llama_dir, tmp_path):
    """Dummy weights quantize as they load; a layer the checkpoint's ignore list names stays in full precision,
    its weight the full-precision dummy one."""
    from quant_checkpoints import changed_quant_config
    ignored = changed_quant_config(checkpoints["fp8-channel"], str(tmp_path / "ignored"),
                                   {"ignore": ["lm_head", "model.layers.0.mlp.down_proj"]})
    llm = LLM(ignored, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    whole = LLM(llama_dir, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    layers = [engine.engine.runner.model.model.layers[0].mlp for engine in (llm, whole)]
    assert layers[0].down_proj.quant is None and torch.equal(layers[0].down_proj.weight, layers[1].down_proj.weight)
    assert layers[0].gate_up_proj.weight.dtype == torch.float8_e4m3fn
    whole.engine.shutdown()
    assert len(llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids) == 3


def _dummy_layer_and_dense(llama_dir: str, tmp_path, config_groups: dict, fmt: str, layer: str):
    """Dummy weights under a compressed-tensors config (ignore lm_head): an engine's layer 0 `layer`
    (after loading: quantized), the same layer's full-precision dummy weight, and the engine."""
    import json
    import shutil
    quantized = str(tmp_path / "dummy")
    shutil.copytree(llama_dir, quantized)
    with open(f"{quantized}/config.json") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
                                     "config_groups": config_groups}
    with open(f"{quantized}/config.json", "w") as f:
        json.dump(config, f)
    llm = LLM(quantized, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    whole = LLM(llama_dir, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    get = lambda engine: engine.engine.runner.model.model.layers[0].get_submodule(layer)  # noqa: E731
    dense = get(whole).weight.detach().clone()
    whole.engine.shutdown()
    return get(llm), dense, llm


@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a16_with_dummy_weights(llama_dir, tmp_path, symmetric):
    """A W8A16 config over random weights (what the benchmarks' qwen3-8b-w8a16 runs): quantized to INT8
    in groups as they load (with zero points where asymmetric), equal within one step of a group's
    scale to the full-precision weight."""
    proj, dense, llm = _dummy_layer_and_dense(llama_dir, tmp_path, {"group_0": {
        "targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 8, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 32}}},
        "pack-quantized", "self_attn.o_proj")
    assert proj.weight.dtype == torch.int8
    assert proj.weight_scale.shape == (proj.weight.shape[0], proj.weight.shape[1] // 32)
    step = proj.weight_scale.repeat_interleave(32, 1)
    offset = proj.weight_offset.repeat_interleave(32, 1) if not symmetric else 0
    assert hasattr(proj, "weight_offset") != symmetric
    assert bool(((proj.weight.float() * step - offset - dense).abs() <= step / 2 + 1e-6).all())
    assert len(llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_quantized_weights_combine_with_a_quantized_kv_cache(checkpoints, w4a16, llama_dir, tmp_path):
    """INT8 K/V under quantized weights moves the prompt's logprobs by a few hundredths (means of
    0.007-0.033 and at most 0.11 on a token, on the CPU; a broken cache or scale moves them by units).
    The random model's first two candidates lie 0.02-0.09 apart (measured on an H200), so greedy may
    take the other one of the pair: it must be one the plain cache rates close to the best."""
    sampling = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5, prompt_logprobs=0)
    from quant_checkpoints import write_gptq_8bit
    gptq_8bit, _ = write_gptq_8bit(llama_dir, str(tmp_path / "gptq8"))
    for path in (checkpoints["fp8-channel"], checkpoints["int8-channel"], w4a16["group-sym"][0], gptq_8bit):
        runs = {}
        for kv in ("auto", "int8"):
            llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, kv_cache_dtype=kv, show_progress=False)
            out = llm.generate({"prompt_token_ids": PROMPT}, sampling, use_tqdm=False)[0]
            assert llm.engine.runner.kv_caches[0].k.dtype == (torch.int8 if kv == "int8" else torch.float32)
            llm.engine.shutdown()
            runs[kv] = ([out.prompt_logprobs[i][PROMPT[i]].logprob for i in range(1, len(PROMPT))],
                        out.outputs[0].token_ids, out.outputs[0].logprobs[0])
        (plain_prompt, _, plain_first), (int8_prompt, int8_out, _) = runs["auto"], runs["int8"]
        err = np.abs(np.array(int8_prompt) - np.array(plain_prompt))
        assert err.mean() < 0.08 and err.max() < 0.3, (err.mean(), err.max())
        best = max(lp.logprob for lp in plain_first.values())
        assert len(int8_out) == 4 and int8_out[0] in plain_first and plain_first[int8_out[0]].logprob > best - 0.15


@pytest.mark.parametrize("method, desc_act", [("gptq", False), ("gptq", True), ("awq", False),
                                              ("compressed-tensors", True)])
def test_4_bit_checkpoints_written_by_hand_run_the_weights_they_encode(llama_dir, tmp_path, method, desc_act):
    """Written by hand to the formats' layouts (GPTQ's and AWQ's producing libraries need a GPU;
    compressed-tensors' act-order groups left its library): 4-bit asymmetric groups of 32 (scattered
    over the input columns with desc_act / actorder "group")."""
    from oracle import hf_logits
    from quant_checkpoints import write_4bit_by_hand
    quantized, dense = write_4bit_by_hand(llama_dir, str(tmp_path / method), method, desc_act=desc_act)
    ours, tokens = _prompt_logprobs(quantized)
    ref = hf_logits(dense, PROMPT).log_softmax(-1)
    np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)
    layer = LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False
                ).engine.runner.model.model.layers[0].self_attn.qkv_proj
    packed = layer.weight_packed if method == "compressed-tensors" else layer.qweight
    assert packed.dtype == torch.int32 and hasattr(layer, "input_order") == desc_act


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_with_a_quantized_lm_head_runs_the_weights_it_encodes(llama_dir, tmp_path, bits):
    """GPTQ's lm_head: true (GPTQModel's option): the LM head's qweight / scales / qzeros run through
    the method of the other layers (where kernels run, one row through its skinny kernel); logits as the weights the
    files encode give them. The same files, their config no longer naming the head, are refused with
    why; a head quantized under tied word embeddings too."""
    import json
    from oracle import hf_logits
    from quant_checkpoints import write_4bit_by_hand, write_gptq_8bit
    from sageinfer.layers.embedding import QuantizedLMHead
    path = str(tmp_path / "gptq")
    quantized, dense = (write_4bit_by_hand(llama_dir, path, "gptq", lm_head=True) if bits == 4 else
                        write_gptq_8bit(llama_dir, path, lm_head=True))
    ours, tokens = _prompt_logprobs(quantized)
    ref = hf_logits(dense, PROMPT).log_softmax(-1)
    np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)
    llm = LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    assert isinstance(llm.engine.runner.model.lm_head, QuantizedLMHead)
    out = llm.generate({"prompt_token_ids": PROMPT[:1]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]  # one row a step
    assert len(out.token_ids) == 3
    llm.engine.shutdown()
    with open(f"{quantized}/config.json") as f:
        config = json.load(f)
    for change, says in (({"lm_head": False}, "does not name"),
                         ({"tie_word_embeddings": True}, "tied word embeddings")):
        edited = {**config, "quantization_config": {**config["quantization_config"], **change}} \
            if "lm_head" in change else {**config, **change}
        with open(f"{quantized}/config.json", "w") as f:
            json.dump(edited, f)
        with pytest.raises(ValueError, match=says):
            LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_the_start_up_log_says_what_is_quantized_and_how(llama_dir, tmp_path, caplog):
    """One line names the scheme, the checkpoint's format and its options; FP4 activations that run in
    16 bits are warned of."""
    import logging
    from quant_checkpoints import write_gptq_8bit
    quantized, _ = write_gptq_8bit(llama_dir, str(tmp_path / "gptq8"), symmetric=False, lm_head=True)
    caplog.set_level(logging.INFO, logger="sageinfer.models.loader")
    LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False).engine.shutdown()
    assert "quantization: w8a16, gptq, groups of 32, asymmetric, LM head quantized" in caplog.text
    fp4 = parse_quant_config({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                              "ignore": ["lm_head"], "config_groups": {"g": {
                                  "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float",
                                                                     "strategy": "tensor_group", "group_size": 16},
                                  "input_activations": {"num_bits": 4, "type": "float", "dynamic": "local"}}}},
                             None)
    assert fp4.unquantized_activations and fp4.describe() == "fp4, nvfp4, groups of 16"


@needs_ranks(2)
@pytest.mark.parametrize("method, desc_act", [("gptq", False), ("awq", False), ("gptq", True),
                                              ("compressed-tensors", True), ("gptq-8bit", True), ("mixed", True)])
def test_tp2_gptq_and_awq_as_tp1(llama_dir, tmp_path, method, desc_act):
    """Act-order groups scatter over the input columns, so o_proj and down_proj split their outputs
    instead of their inputs at tp=2 (gathering input and output): the same logprobs as tp=1. "mixed":
    compressed-tensors act-order in two config groups (attention, MLP), whose layers learn their scheme
    after they are built."""
    import json
    from quant_checkpoints import write_4bit_by_hand, write_gptq_8bit
    if method == "gptq-8bit":
        quantized, _ = write_gptq_8bit(llama_dir, str(tmp_path / method), desc_act=desc_act)
    else:
        quantized, _ = write_4bit_by_hand(llama_dir, str(tmp_path / method),
                                          "compressed-tensors" if method == "mixed" else method, desc_act=desc_act)
    if method == "mixed":
        with open(f"{quantized}/config.json") as f:
            config = json.load(f)
        scheme = config["quantization_config"]["config_groups"].pop("group_0")
        config["quantization_config"]["config_groups"] = {
            "attention": {**scheme, "targets": ["re:.*self_attn.*"]}, "mlp": {**scheme, "targets": ["re:.*mlp.*"]}}
        with open(f"{quantized}/config.json", "w") as f:
            json.dump(config, f)
    one, two = (_prompt_logprobs(quantized, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one[0], two[0], atol=1e-4)
    assert one[1] == two[1]


@needs_ranks(2)
@pytest.mark.parametrize("symmetric, lm_head", [(True, False), (False, True)])
def test_tp2_8_bit_gptq_as_tp1(llama_dir, tmp_path, symmetric, lm_head):
    """Zero points split over ranks as the scales do (by output for column-parallel layers, by group
    for row-parallel ones); a quantized LM head by vocabulary rows, its logits gathered."""
    from quant_checkpoints import write_gptq_8bit
    quantized, _ = write_gptq_8bit(llama_dir, str(tmp_path / "gptq8"), symmetric=symmetric, lm_head=lm_head)
    one, two = (_prompt_logprobs(quantized, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one[0], two[0], atol=1e-4)


@pytest.mark.parametrize("desc_act, v2, symmetric", [(False, False, True), (True, False, True), (False, True, True),
                                                     (False, False, False), (True, False, False)])
def test_8_bit_gptq_runs_the_weights_it_encodes(llama_dir, tmp_path, desc_act, v2, symmetric):
    """GPTQ 8-bit (Qwen's GPTQ-Int8 layout), written by hand: groups of 32 (scattered over the input
    columns with desc_act; zero points stored minus one in the original format, as they are in v2),
    symmetric or each group's range onto [0, 255] with its zero point. The layers hold INT8 weights with
    their group scales; a checkpoint that says sym true but holds other zero points is refused."""
    from oracle import hf_logits
    from quant_checkpoints import write_gptq_8bit
    quantized, dense = write_gptq_8bit(llama_dir, str(tmp_path / "gptq8"), desc_act=desc_act, v2=v2,
                                       symmetric=symmetric)
    ours, tokens = _prompt_logprobs(quantized)
    ref = hf_logits(dense, PROMPT).log_softmax(-1)
    np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)
    llm = LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    layer = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (layer.weight.shape[0], 2)
    assert hasattr(layer, "input_order") == desc_act and not hasattr(layer, "qweight")
    assert hasattr(layer, "weight_offset") != symmetric
    llm.engine.shutdown()
    if not desc_act and not v2 and symmetric:
        mislabelled, _ = write_gptq_8bit(llama_dir, str(tmp_path / "mislabelled"), zero=120)
        with pytest.raises(ValueError, match="zero points other than 128"):
            LLM(mislabelled, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


@pytest.mark.parametrize("rows", [1, 3, 40, 80])
@pytest.mark.parametrize("group, symmetric", [(64, True), (None, True), (64, False)])
def test_an_8_bit_weight_only_layer_with_kernels_is_its_dequantized_weight(rows, group, symmetric, monkeypatch):
    """An INT8 weight-only layer where the platform runs Triton: one row through the skinny kernel
    (group scales in registers, or a scale per row applied to the sums), up to 64 rows through the
    8-bit weight-only kernel, more through the weight expanded in one pass; each the product with the
    weights the bytes encode. With zero points (compressed-tensors' asymmetric W8A16) every row count
    takes the general path and subtracts each group's zero times the input's sum over it."""
    from kernels_util import DEVICE
    from quant_checkpoints import _pack_bytes
    from sageinfer.layers.linear import Linear
    from sageinfer.layers.quantization import QuantConfig, set_quant_config, w8a16
    from sageinfer.ops import gemv as gemv_module
    kernel_calls, one_row_calls = [], []
    kernel = w8a16.w8a16_block_matmul
    monkeypatch.setattr(w8a16, "w8a16_block_matmul", lambda *a, **k: kernel_calls.append(a) or kernel(*a, **k))
    one_row = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: one_row_calls.append(k) or one_row(*a, **k))
    gen = torch.Generator().manual_seed(rows)
    set_quant_config(QuantConfig("w8a16", "group" if group else "channel", False, True, group_size=group,
                                 symmetric=symmetric))
    try:
        layer = Linear(256, 48)
    finally:
        set_quant_config(None)
    q = torch.randint(-128, 128, (48, 256), generator=gen)
    scales = torch.rand(48, 256 // (group or 256), generator=gen) / 50
    layer.weight_packed.data = _pack_bytes(q + 128)  # as compressed-tensors stores them
    layer.weight_scale.data = scales
    zeros = torch.zeros_like(scales)
    if not symmetric:  # packed along the output, four a word
        zeros = torch.randint(-20, 20, scales.shape, generator=gen).float()
        layer.weight_zero_point.weight_loader(layer.weight_zero_point, _pack_bytes(zeros.t() + 128).t())
    layer.process_after_loading()
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, q.to(torch.int8))
    layer.to(DEVICE).use_triton = True
    x = torch.randn(rows, 256, generator=gen)
    encoded = (q.double() - zeros.double().repeat_interleave(group or 256, 1)) \
        * scales.double().repeat_interleave(group or 256, 1)
    ref = x.double() @ encoded.t()
    tol = 1e-2 if DEVICE != "cpu" else 1e-4  # (tf32 dots on a GPU)
    torch.testing.assert_close(layer(x.to(DEVICE)).double().cpu(), ref, rtol=tol, atol=tol)
    assert len(kernel_calls) == (1 if 2 <= rows <= 64 or (rows == 1 and not symmetric) else 0)
    assert len(one_row_calls) == (rows == 1 and symmetric)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("rows", [1, 3, 80])
def test_an_fp4_layer_runs_the_weights_it_encodes(rows, fmt):
    """FP4 (compressed-tensors nvfp4- and mxfp4-pack-quantized) held at four bits with the checkpoint's scale
    bytes (NVFP4: FP8 over the tensor's global scale; MXFP4: a power of two); one row (the one-row kernel's
    fp16-pair loop), a few rows (its tensor-core kernel) and many (the weights expanded), each the
    product with the weights compressed-tensors' own unpacking gives."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from kernels_util import DEVICE, rel_err
    from sageinfer.layers.linear import Linear
    from sageinfer.layers.quantization import QuantConfig, set_quant_config
    from sageinfer.ops.fp4_weights import fp4_dequantize
    gen = torch.Generator().manual_seed(rows)
    group = 16 if fmt == "nvfp4" else 32
    set_quant_config(QuantConfig("fp4", "group", False, True, group_size=group, format=fmt))
    try:
        layer = Linear(128, 48)
    finally:
        set_quant_config(None)
    packed = torch.randint(0, 256, (48, 64), generator=gen).to(torch.uint8)
    if fmt == "nvfp4":
        scale = (torch.rand(48, 8, generator=gen) * 400 + 8).to(torch.float8_e4m3fn)
        tensors = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": torch.tensor([900.0])}
        group_scale = scale.float() / 900.0
    else:
        scale = torch.randint(115, 130, (48, 4), generator=gen).to(torch.uint8)
        tensors = {"weight_packed": packed, "weight_scale": scale}
        group_scale = decompress_mx_scale(scale).float()
    for name, tensor in tensors.items():
        getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    layer.process_after_loading()
    encoded = unpack_fp4_from_uint8(packed, 48, 128, dtype=torch.float32) * group_scale.repeat_interleave(group, 1)
    assert layer.weight.dtype == torch.int32 and layer.weight.shape == (48, 16)  # four bits a weight
    torch.testing.assert_close(fp4_dequantize(layer.weight, layer.weight_scale, layer.weight_row_scale, group,
                                              fmt == "mxfp4", torch.float32, layer.quant.slice_width), encoded)
    layer.to(DEVICE).use_triton = True
    x = torch.randn(rows, 128, generator=gen)
    tol = 1e-2 if DEVICE != "cpu" else 1e-4
    if rows == 1:  # a 16-bit model's row: sums in fp16, within fp16's precision of the whole
        x = x.half()
        assert rel_err(layer(x.to(DEVICE)).double().cpu(), x.double() @ encoded.double().t()) < 3e-3
        return
    torch.testing.assert_close(layer(x.to(DEVICE)).double().cpu(), x.double() @ encoded.double().t(), rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_with_dummy_weights(llama_dir, tmp_path, fmt):
    """An NVFP4 or MXFP4 config over random weights (benchmarks at 8B shapes): quantized as llm-compressor
    quantizes, each weight within one e2m1 unit of its full-precision value (MXFP4's power-of-two
    scales leave the largest values of a group up to 8 units, saturated at 6: within two units)."""
    group, strategy = (16, "tensor_group") if fmt == "nvfp4" else (32, "group")
    proj, dense, llm = _dummy_layer_and_dense(llama_dir, tmp_path, {"group_0": {
        "targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 4, "type": "float", "symmetric": True, "strategy": strategy, "group_size": group}}},
        f"{fmt}-pack-quantized", "mlp.down_proj")
    from sageinfer.ops.fp4_weights import fp4_dequantize, group_scale_values
    mx = fmt == "mxfp4"
    assert proj.weight.dtype == torch.int32 and proj.weight.shape[1] * 8 == dense.shape[1]
    assert proj.weight_scale.dtype == torch.uint8 and proj.weight_scale.shape == (dense.shape[0], dense.shape[1] // group)
    unit = (group_scale_values(proj.weight_scale, mx) * proj.weight_row_scale[:, None]).repeat_interleave(group, 1)
    weights = fp4_dequantize(proj.weight, proj.weight_scale, proj.weight_row_scale, group, mx, torch.float32,
                             proj.quant.slice_width)
    assert bool(((weights - dense).abs() <= (2 * unit if mx else unit) + 1e-9).all())
    assert len(llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_block_fp8_checkpoint_runs_the_weights_it_encodes(llama_dir, tmp_path):
    from oracle import hf_logits
    from quant_checkpoints import write_fp8_blocks
    quantized, dense = write_fp8_blocks(llama_dir, str(tmp_path / "fp8-blocks"))
    ours, _ = _prompt_logprobs(quantized)
    ref = hf_logits(dense, PROMPT).log_softmax(-1)
    np.testing.assert_allclose(ours, [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], atol=1e-4)
    layer = LLM(quantized, dtype="float32", num_gpu_blocks_override=128, show_progress=False
                ).engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.shape[0] == layer.weight.shape[0]
    dummy = LLM(quantized, dtype="float32", load_format="dummy", num_gpu_blocks_override=128, show_progress=False)
    assert dummy.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn


@needs_ranks(2)
def test_tp2_block_fp8_as_tp1(llama_dir, tmp_path):
    from quant_checkpoints import write_fp8_blocks
    quantized, _ = write_fp8_blocks(llama_dir, str(tmp_path / "fp8-blocks"))
    one, two = (_prompt_logprobs(quantized, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one[0], two[0], atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 8, 20, 32, 33, 80])
def test_a_w4a16_layer_with_kernels_is_its_dequantized_weight(rows, monkeypatch):
    """A 4-bit layer where the platform runs Triton: one row through the skinny kernel, 2 to 32 rows
    through its tensor-core form, more through the weight expanded in one pass, each the product with
    the weights the packed words encode."""
    from sageinfer.layers.quantization import w4a16
    tensor_core_calls = []
    tensor_core = w4a16.w4a16_mma_matmul
    monkeypatch.setattr(w4a16, "w4a16_mma_matmul",
                        lambda *a, **k: tensor_core_calls.append(a) or tensor_core(*a, **k))
    from sageinfer.layers.linear import Linear
    from sageinfer.layers.quantization import QuantConfig, set_quant_config
    from sageinfer.ops.weight_only import dequantize, pack
    gen = torch.Generator().manual_seed(rows)
    set_quant_config(QuantConfig("w4a16", "group", False, True, group_size=64, symmetric=False, format="gptq"))
    try:
        layer = Linear(256, 48)
    finally:
        set_quant_config(None)
    from kernels_util import DEVICE
    layer.qweight.data = pack(torch.randint(0, 16, (48, 256), generator=gen))  # as loaded: columns in order
    layer.scales.data = torch.rand(48, 4, generator=gen) / 8
    layer.qzeros.data = torch.randint(-3, 4, (48, 4), generator=gen, dtype=torch.int32)
    ref = dequantize(layer.qweight.data, layer.scales.data, layer.qzeros.data, 64, torch.float64)
    layer.process_after_loading()  # interleaved for the kernels
    assert layer.quant.slice_width == 32
    layer.to(DEVICE).use_triton = True
    x = torch.randn(rows, 256, generator=gen)
    ref = x.double() @ ref.t()
    # On a GPU float32 products may run in tf32.
    tol = 1e-2 if DEVICE != "cpu" else 1e-4
    torch.testing.assert_close(layer(x.to(DEVICE)).double().cpu(), ref, rtol=tol, atol=tol)
    assert len(tensor_core_calls) == (1 if 2 <= rows <= 32 else 0)


def _block_fp8_layer(in_features: int, out_features: int, block: int, gen: torch.Generator,
                     activations: bool = True):
    """A block-FP8 linear layer with random FP8 weights and a random scale per block x block tile
    (activations False: weight-only tiles, as ModelOpt's FP8_PB_WO)."""
    from sageinfer.layers.linear import Linear
    from sageinfer.layers.quantization import QuantConfig, set_quant_config
    set_quant_config(QuantConfig("fp8-block", "block", activations, True, group_size=block, format="fp8"))
    try:
        layer = Linear(in_features, out_features)
    finally:
        set_quant_config(None)
    layer.weight.data = (torch.randn(out_features, in_features, generator=gen) * 100).clamp(-448, 448).to(
        torch.float8_e4m3fn)
    tiles = torch.rand(out_features // block, in_features // block, generator=gen) / 50
    layer.weight_scale_inv.data = tiles.repeat_interleave(block, 0)
    return layer


@pytest.mark.parametrize("rows", [3, 20, 80])
def test_a_block_fp8_layer_with_kernels_is_its_dequantized_weight(rows):
    """A block-FP8 layer where the platform runs Triton: up to 64 rows through the kernel that scales
    the FP8 tiles in registers, more through the weight expanded in one pass."""
    from kernels_util import DEVICE
    from sageinfer.ops.weight_only import dequantize_8bit_groups
    gen = torch.Generator().manual_seed(rows)
    layer = _block_fp8_layer(128, 64, 32, gen)
    layer.to(DEVICE).use_triton = True
    x = torch.randn(rows, 128, generator=gen)
    ref = x.double() @ dequantize_8bit_groups(layer.weight.cpu(), layer.weight_scale_inv.cpu(), 32, torch.float64).t()
    tol = 1e-2 if DEVICE != "cpu" else 1e-4  # (tf32 dots on a GPU)
    torch.testing.assert_close(layer(x.to(DEVICE)).double().cpu(), ref, rtol=tol, atol=tol)


def test_activations_quantized_per_token_and_128_columns():
    from sageinfer.layers.quantization.fp8_block import quantize_groups
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen) * torch.tensor([1.0, 100.0]).repeat_interleave(128)
    xq, scale = quantize_groups(x, 128)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (5, 2)
    torch.testing.assert_close(scale, x.view(5, 2, 128).abs().amax(-1) / 448)
    back = xq.float() * scale.repeat_interleave(128, 1)
    assert float(((back - x).abs() / x.abs().clamp(min=1e-3)).median()) < 0.04  # e4m3: 3 mantissa bits


def test_a_block_fp8_layer_above_64_rows_takes_the_platforms_block_gemm(monkeypatch):
    """Where the platform has a block-scaled FP8 GEMM (NVIDIA: cuBLAS through torch's scaled_mm,
    checked once against the dequantized product), layers of 128 x 128 tiles give it their activations
    per token and 128 columns and one scale per tile; the product is the expanded layer's within what
    quantizing the activations costs. Here a stand-in GEMM computes the block-scaled product itself."""
    from sageinfer.ops.weight_only import dequantize_8bit_groups
    from sageinfer.platforms.cpu import CpuPlatform
    calls = []

    def block_gemm(self, xq, x_scale, wq, w_scale, out_dtype):
        calls.append((tuple(x_scale.shape), tuple(w_scale.shape)))
        w = dequantize_8bit_groups(wq, w_scale.repeat_interleave(128, 0), 128, torch.float32)
        return ((xq.float() * x_scale.repeat_interleave(128, 1)) @ w.t()).to(out_dtype)
    monkeypatch.setattr(CpuPlatform, "supports_fp8_block_gemm", lambda self: True)
    monkeypatch.setattr(CpuPlatform, "fp8_block_matmul", block_gemm)
    gen = torch.Generator().manual_seed(1)
    layer = _block_fp8_layer(256, 384, 128, gen)
    layer.platform = CpuPlatform()
    layer.quant.prepare(layer)
    x = torch.randn(80, 256, generator=gen)
    ref = x @ dequantize_8bit_groups(layer.weight, layer.weight_scale_inv, 128, torch.float32).t()
    y = layer(x)
    assert calls == [((80, 2), (3, 2))]
    assert float((y - ref).abs().max()) < 0.05 * float(ref.abs().max())
    weight_only = _block_fp8_layer(256, 384, 128, gen, activations=False)  # its activations stay 16-bit
    weight_only.platform = CpuPlatform()
    weight_only.quant.prepare(weight_only)
    ref = x @ dequantize_8bit_groups(weight_only.weight, weight_only.weight_scale_inv, 128, torch.float32).t()
    torch.testing.assert_close(weight_only(x), ref)
    assert len(calls) == 1


def test_the_benchmarks_quantized_configs_read_as_their_schemes():
    """benchmarks/gpu_quant.sh runs these Qwen3-8B configs with dummy weights: each names its method."""
    from sageinfer.bench.workloads import STANDARD_DIR
    from sageinfer.layers.quantization.config import load_quant_config
    expected = {"qwen3-8b-fp8-block": "fp8-block", "qwen3-8b-int8-w8a8": "int8", "qwen3-8b-w4a16": "w4a16",
                "qwen3-8b-w8a16": "w8a16", "qwen3-8b-nvfp4": "fp4", "qwen3-8b-mxfp4": "fp4",
                "qwen3-8b-bnb-nf4": "bnb4"}
    assert {name: load_quant_config(os.path.join(STANDARD_DIR, name), None).scheme for name in expected} == expected
