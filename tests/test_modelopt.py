"""Checkpoints exported by NVIDIA ModelOpt itself (nvidia-modelopt's mtq.quantize then export_hf_checkpoint,
the format of NVIDIA's -FP8 and -FP4 releases): a tiny llama trained on the tokenizer's corpus, quantized
and calibrated on the corpus, exported as FP8 (static activation scales, with and without an FP8 KV cache),
FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO (128 x 128 tiles, weight-only), NVFP4 and W4A16_NVFP4. Oracles:
ModelOpt's own forward of the quantized model (its quantizers in torch) where it runs on a CPU and the
export keeps its weights (FP8, FP8 per channel), else transformers running the weights ModelOpt's QTensors
decode from the files (FP4 activations run in 16 bits here, as for compressed-tensors' NVFP4)."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from quant_checkpoints import changed_quant_config, save_dense
from ranks import needs_ranks
from trained_model import prompt_logprobs
from sageinfer import LLM

pytest.importorskip("modelopt.torch.quantization")

_GPU = torch.cuda.is_available()
# name: (ModelOpt config, its KV config, whether its own forward is the oracle: NVFP4's fake quantization
# of activations needs CUDA, and FP8_PB_WO's export quantizes a merged layer's parts (q/k/v, gate/up) again
# with one shared scale a tile, so its files are not the weights its forward ran)
ALGOS = {"fp8": ("FP8_DEFAULT_CFG", None, True), "fp8-kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG", True),
         "fp8-per-channel-per-token": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", None, True),
         "fp8-pb-wo": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None, False),
         "nvfp4": ("NVFP4_DEFAULT_CFG", None, False), "w4a16-nvfp4": ("W4A16_NVFP4_CFG", None, False)}
UNMERGED = ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj")


def _logprobs_of(logits: torch.Tensor, ids: list[int]) -> np.ndarray:
    lp = logits.log_softmax(-1)
    return np.array([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])


def _one_kv_scale_a_layer(model) -> None:
    """K and V of a layer calibrated to the larger of their two scales: the cache kernels take one scale a
    layer (as for compressed-tensors' k_scale / v_scale), so ModelOpt's forward then quantizes as ours does."""
    for module in model.modules():
        if hasattr(module, "k_bmm_quantizer"):
            both = torch.maximum(module.k_bmm_quantizer.amax, module.v_bmm_quantizer.amax)
            module.k_bmm_quantizer.amax, module.v_bmm_quantizer.amax = both.clone(), both.clone()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """name: (export directory, ModelOpt's own logprobs of the first 40 corpus tokens or None, FP8_PB_WO's
    fake-quantized weights of two layers no export merges)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ids = trained
    chunks = [torch.tensor([ids[i:i + 64]]) for i in range(0, len(ids) - 64, 32)]
    root = tmp_path_factory.mktemp("modelopt")
    out = {}
    for name, (cfg_name, kv_name, runs_here) in ALGOS.items():
        config = copy.deepcopy(getattr(mtq, cfg_name))
        if kv_name is not None:
            config["quant_cfg"] = list(config["quant_cfg"]) + list(getattr(mtq, kv_name)["quant_cfg"])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model = mtq.quantize(model, config, lambda m: [m(c) for c in chunks])
        if kv_name is not None:
            _one_kv_scale_a_layer(model)
        reference, fake = None, {}
        with torch.no_grad():
            if runs_here:
                reference = _logprobs_of(model(torch.tensor([ids[:40]])).logits[0], ids[:40])
            if name == "fp8-pb-wo":
                fake = {n: model.get_submodule(n).weight_quantizer(model.get_submodule(n).weight) for n in UNMERGED}
        out[name] = (str(root / name), reference, fake)
        with torch.inference_mode():  # (export turns the model's own weights into the files' codes)
            export_hf_checkpoint(model, export_dir=out[name][0], dtype=torch.float32)
        AutoTokenizer.from_pretrained(path).save_pretrained(out[name][0])
    return out


def _decoded(tensors: dict, layer: str, codes: torch.Tensor) -> torch.Tensor:
    """A layer's weight decoded by ModelOpt's own QTensors: NVFP4 (uint8 codes, e2m1 * weight_scale *
    weight_scale_2 in groups of 16) or FP8 in 128 x 128 tiles (weight_scale [out / 128, 1, in / 128, 1])."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor
    scale = tensors[layer + ".weight_scale"]
    if codes.dtype == torch.uint8:
        shape = torch.Size([codes.shape[0], 2 * codes.shape[1]])
        return NVFP4QTensor(shape, torch.float32, codes).dequantize(
            torch.float32, scale=scale, double_scale=tensors[layer + ".weight_scale_2"], block_sizes={-1: 16})
    tiles = [-(-n // 128) for n in codes.shape]  # (a projection's last tile may hold fewer rows)
    padded = torch.zeros(tiles[0] * 128, tiles[1] * 128, dtype=codes.dtype)
    padded[:codes.shape[0], :codes.shape[1]] = codes
    return FP8QTensor(codes.shape, torch.float32, padded).dequantize(
        torch.float32, scale=scale.float().reshape(tiles), block_sizes={0: 128, 1: 128})


def _decoded_copy(quantized: str, dst: str) -> str:
    """The export's weights decoded (_decoded) into a float32 checkpoint without quantization configs:
    what transformers runs as the oracle, activations in full precision."""
    from safetensors.torch import load_file
    shutil.copytree(quantized, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    dense = {}
    for name, t in tensors.items():
        layer, _, last = name.rpartition(".")
        if last == "weight" and t.dtype in (torch.uint8, torch.float8_e4m3fn):
            dense[name] = _decoded(tensors, layer, t)
        elif last not in ("weight_scale", "weight_scale_2", "input_scale"):
            dense[name] = t
    os.remove(os.path.join(dst, "hf_quant_config.json"))
    return save_dense(dense, dst)


@pytest.mark.parametrize("name", ["fp8", "fp8-per-channel-per-token", "fp8-pb-wo", "nvfp4", "w4a16-nvfp4"])
def test_modelopt_export_matches_its_oracle(trained, exported, name, tmp_path):
    """FP8 (one weight scale and one calibrated activation scale a layer) and FP8 per channel with
    activations per token: ModelOpt's own forward of the quantized model; FP8_PB_WO, NVFP4 and W4A16_NVFP4:
    the weights ModelOpt decodes from the files, run by transformers. Measured on the CPU: at most 2e-6 apart."""
    from oracle import hf_logits
    ids = trained[1][:40]
    path, reference, _ = exported[name]
    if reference is None:
        reference = _logprobs_of(hf_logits(_decoded_copy(path, str(tmp_path / "decoded")), ids), ids)
    np.testing.assert_allclose(prompt_logprobs(path, ids), reference, atol=5e-2 if _GPU else 1e-4)


def test_fp8_pb_wo_tiles_are_read_as_modelopt_quantized_them(exported):
    """The layers no export merges hold, tile for tile, the weights ModelOpt's quantizer made, to float32's
    last bit (the order of the [out / 128, 1, in / 128, 1] scales: down_proj has two tiles along its input)."""
    from safetensors.torch import load_file
    path, _, fake = exported["fp8-pb-wo"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for layer, weight in fake.items():
        torch.testing.assert_close(_decoded(tensors, layer, tensors[layer + ".weight"]), weight, rtol=1e-6, atol=0)
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.quant.dequantized_weight(down), fake["model.layers.0.mlp.down_proj"],
                               rtol=1e-6, atol=0)
    llm.engine.shutdown()


def test_modelopt_layers_hold_their_scheme(exported):
    """Each export's layers are held as its scheme says; the excluded LM head stays whole."""
    expected = {"fp8": torch.float8_e4m3fn, "fp8-per-channel-per-token": torch.float8_e4m3fn,
                "fp8-pb-wo": torch.float8_e4m3fn, "nvfp4": torch.int32,
                "w4a16-nvfp4": torch.int32}  # FP4: eight e2m1 codes a word
    for name, dtype in expected.items():
        llm = LLM(exported[name][0], dtype="float32", num_gpu_blocks_override=128, show_progress=False)
        model = llm.engine.runner.model
        assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == dtype, name
        assert model.model.layers[1].mlp.down_proj.weight.dtype == dtype, name
        assert model.lm_head.weight.dtype == torch.float32, name
        if name == "fp8":  # one calibrated activation scale a layer (q/k/v's the same one, as ModelOpt exports)
            assert float(model.model.layers[0].self_attn.qkv_proj.input_scale) > 0
        llm.engine.shutdown()


def test_modelopt_fp8_kv_cache_scales_reach_the_cache(trained, exported):
    """FP8 with kv_cache_quant_algo FP8 leaves k_proj.k_scale / v_proj.v_scale a layer: an FP8 cache takes
    them (here K and V calibrated to one scale a layer, the one the kernels take), and its logprobs follow
    ModelOpt's forward with its K and V quantizers on (measured on the CPU: 2e-3 apart at most: this engine
    attends a prompt's own new keys before they are rounded into the cache); a bf16 cache ignores them."""
    from safetensors import safe_open
    path, reference, _ = exported["fp8-kv"]
    ids = trained[1][:40]
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        expected = [max(float(f.get_tensor(f"model.layers.{i}.self_attn.{w}_proj.{w}_scale")) for w in "kv")
                    for i in range(2)]
    assert all(0 < e < 0.5 for e in expected), expected  # calibrated, not the default 1.0
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False, kv_cache_dtype="fp8")
    assert [c.fp8_scale for c in llm.engine.runner.kv_caches] == pytest.approx(expected)
    llm.engine.shutdown()
    np.testing.assert_allclose(prompt_logprobs(path, ids, kv_cache_dtype="fp8"), reference, atol=5e-2 if _GPU else 5e-3)
    np.testing.assert_allclose(prompt_logprobs(path, ids), exported["fp8"][1], atol=5e-2 if _GPU else 1e-4)


def test_an_older_export_with_only_hf_quant_config_json(trained, exported, tmp_path):
    """ModelOpt's older exports describe the scheme only in hf_quant_config.json: the same logprobs as with
    the quantization_config in config.json."""
    for name in ("fp8", "nvfp4"):
        dst = str(tmp_path / name)
        shutil.copytree(exported[name][0], dst)
        with open(f"{dst}/config.json") as f:
            config = json.load(f)
        del config["quantization_config"]
        with open(f"{dst}/config.json", "w") as f:
            json.dump(config, f)
        ids = trained[1][:24]
        np.testing.assert_allclose(prompt_logprobs(dst, ids), prompt_logprobs(exported[name][0], ids), atol=1e-6)


def test_perplexity_of_each_modelopt_scheme_against_full_precision(trained, exported):
    """The corpus's perplexity through each export over the trained model's. Measured on the CPU: FP8
    +1.44%, with the FP8 cache +1.43%, per channel and token +1.26%, FP8_PB_WO +0.60% (its activations stay
    16-bit), NVFP4 and W4A16_NVFP4 +8.4% (the same weights; NVFP4's activations run in 16 bits)."""
    path, ids = trained

    def perplexity(p, **options):
        return float(np.exp(-prompt_logprobs(p, ids, **options).mean()))

    base = perplexity(path)
    ratios = {name: perplexity(exported[name][0]) / base for name in ALGOS if name != "fp8-kv"}
    ratios["fp8-kv"] = perplexity(exported["fp8-kv"][0], kv_cache_dtype="fp8") / base
    assert all(ratios[name] < BOUNDS[name] for name in ALGOS), ratios


BOUNDS = {"fp8": 1.02, "fp8-kv": 1.02, "fp8-per-channel-per-token": 1.02, "fp8-pb-wo": 1.02, "nvfp4": 1.1,
          "w4a16-nvfp4": 1.1}


@pytest.mark.parametrize("algo,kv", [("W4A16_AWQ", None), ("W8A8_SQ_PER_CHANNEL", None), ("MIXED_PRECISION", None),
                                     ("FP8", "NVFP4")])
def test_modelopt_schemes_not_served_are_refused_at_start(exported, tmp_path, algo, kv):
    """Another ModelOpt algorithm, or a KV cache quantized otherwise than to FP8, is refused before any
    weight loads, with what is supported."""
    dst = changed_quant_config(exported["fp8"][0], str(tmp_path / "other"),
                               {"quant_algo": algo, "kv_cache_quant_algo": kv})
    with pytest.raises(ValueError, match=f"modelopt quant_algo '{algo}' with kv_cache_quant_algo .*supported: "):
        LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_quantization_option_names_for_modelopt(trained, exported):
    """vLLM's names for a ModelOpt checkpoint (modelopt, modelopt_fp4) are taken; another method is refused
    as not the checkpoint's."""
    ids = trained[1][:16]
    same = prompt_logprobs(exported["nvfp4"][0], ids)
    for option in ("modelopt", "modelopt_fp4"):
        np.testing.assert_allclose(prompt_logprobs(exported["nvfp4"][0], ids, quantization=option), same, atol=1e-6)
    with pytest.raises(ValueError, match="quantized with 'modelopt'; quantization='fp8' does not match"):
        LLM(exported["fp8"][0], dtype="float32", num_gpu_blocks_override=128, show_progress=False,
            quantization="fp8")


@pytest.mark.parametrize("name", ["fp8", "nvfp4"])
def test_dummy_weights_with_a_modelopt_config(exported, name):
    """load_format='dummy' for benchmarks: random weights held as the export's scheme."""
    from quant_checkpoints import dummy_weights_dtype
    assert dummy_weights_dtype(exported[name][0]) == (torch.float8_e4m3fn if name == "fp8" else torch.int32)


@needs_ranks(2)
def test_modelopt_nvfp4_at_two_ranks_gives_one_ranks_logprobs(trained, exported):
    ids = trained[1][:40]
    one, two = (prompt_logprobs(exported["nvfp4"][0], ids, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one, two, atol=1e-4)
