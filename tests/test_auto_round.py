"""Checkpoints made by Intel's AutoRound itself (auto-round's AutoRound(...).quantize_and_save), in its own
format (quant_method "auto-round", packed as auto_gptq or auto_awq) and in the GPTQ and AWQ formats it also
writes: a tiny llama trained on the tokenizer's corpus, 4-bit symmetric and asymmetric in groups of 128 and
8-bit. Oracles: transformers running the weights the files encode multiplied out in float32, and
transformers running the auto-round checkpoint (AutoRound's own torch kernel, which forms each weight in
fp16) where it can without auto-round-lib."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from oracle import hf_prompt_logprobs
from quant_checkpoints import changed_quant_config
from trained_model import prompt_logprobs
from sageinfer import LLM

pytest.importorskip("auto_round")

_GPU = torch.cuda.is_available()
# name: (bits, symmetric, formats written)
SCHEMES = {"w4-sym": (4, True, ("auto_round", "auto_gptq", "auto_awq")),
           "w4-asym": (4, False, ("auto_round", "auto_gptq")), "w8-sym": (8, True, ("auto_round",))}


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    """(scheme, format): the checkpoint's directory. Round-to-nearest (iters=0): AutoRound's tuning is no
    concern of the format."""
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, ids = trained
    root = tmp_path_factory.mktemp("auto-round")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.decode(ids)
    out = {}
    for name, (bits, sym, formats) in SCHEMES.items():
        for fmt in formats:  # one run a format (auto-round 0.15.1 fails to write auto_awq after another format)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            rounder = AutoRound(model, tokenizer, bits=bits, group_size=128, sym=sym, iters=0, nsamples=4,
                                seqlen=32, dataset=[text] * 4)
            rounder.quantize_and_save(str(root / name / fmt), format=fmt)
            written = [d for d, _, files in os.walk(root / name / fmt) if "config.json" in files]
            out[name, fmt] = written[0]
    return out


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words of 32 / bits values (value i in bits i * bits ..) -> the values, unpacked along dim."""
    values = torch.stack([(words >> (bits * i)) & ((1 << bits) - 1) for i in range(32 // bits)], dim + 1)
    shape = list(words.shape)
    shape[dim] *= 32 // bits
    return values.reshape(shape)


def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's words [rows, cols / 8] -> [rows, cols]: its packer puts column order[i] of each eight in
    nibble i, order = 0 2 4 6 1 3 5 7."""
    nibbles = _unpack(words, 4, 1).view(words.shape[0], -1, 8)
    columns = torch.empty_like(nibbles)
    columns[:, :, [0, 2, 4, 6, 1, 3, 5, 7]] = nibbles
    return columns.reshape(words.shape[0], -1)


def _multiplied_out(quantized_dir: str, dst: str) -> str:
    """The auto-round checkpoint's weights in float32, without quantization configs. Packed as auto_gptq:
    qweight [in / pack, out], w = scale * (q - (qzero + 1)) (GPTQ's original format stores each zero point
    less one); as auto_awq: qweight [in, out / 8] and qzeros in AutoAWQ's column order, w = scale * (q - qzero)."""
    shutil.copytree(quantized_dir, dst)
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    quant = config.pop("quantization_config")
    bits, awq = quant["bits"], quant["packing_format"] == "auto_round:auto_awq"
    dense = {}
    for name, t in tensors.items():
        layer, _, last = name.rpartition(".")
        if last == "qweight":
            scales = tensors[layer + ".scales"].float()
            if awq:
                q, zeros = _awq_columns(t).float(), _awq_columns(tensors[layer + ".qzeros"]).float()
            else:
                q, zeros = _unpack(t, bits, 0).float(), _unpack(tensors[layer + ".qzeros"], bits, 1).float() + 1
            group = q.shape[0] // scales.shape[0]
            weight = (q - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
            dense[layer + ".weight"] = weight.t()
        elif last not in ("qzeros", "scales", "g_idx"):
            dense[name] = t
    save_file({k: v.contiguous() for k, v in dense.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    if os.path.exists(os.path.join(dst, "quantization_config.json")):
        os.remove(os.path.join(dst, "quantization_config.json"))
    return dst


@pytest.mark.parametrize("key", [(name, fmt) for name, (_, _, formats) in SCHEMES.items() for fmt in formats],
                         ids=lambda key: "-".join(key))
def test_auto_round_checkpoint_matches_its_oracles(trained, quantized, key, tmp_path):
    """Every format of a scheme encodes the same weights (round-to-nearest is deterministic): each matches
    transformers on the auto-round file's weights multiplied out in float32 (measured on the CPU: 1.3e-6
    apart), and where AutoRound packs as GPTQ (symmetric weights), transformers running the auto-round file
    itself, whose kernel rounds each weight to fp16 (3.3e-3 apart at 4 bits, 3.6e-3 at 8)."""
    ids = trained[1][:40]
    native = quantized[key[0], "auto_round"]
    ours = prompt_logprobs(quantized[key], ids)
    dense = hf_prompt_logprobs(_multiplied_out(native, str(tmp_path / "dense")), ids)
    np.testing.assert_allclose(ours, dense, atol=5e-2 if _GPU else 1e-4)
    with open(os.path.join(native, "config.json")) as f:
        packing = json.load(f)["quantization_config"]["packing_format"]
    if packing == "auto_round:auto_gptq":  # (AutoRound writes asymmetric weights packed as AWQ; transformers
        # runs those only with auto-round-lib, a 58 MB binary package the tests do without)
        np.testing.assert_allclose(ours, hf_prompt_logprobs(native, ids), atol=5e-2 if _GPU else 1e-2)


def test_auto_round_config_is_read_as_written(quantized):
    """What each format's config says reaches the layers: AWQ's zero_point false (a symmetric export whose
    qzeros hold 8), the auto-round format's own packing, 8 bits through the 8-bit weight-only path."""
    with open(os.path.join(quantized["w4-sym", "auto_awq"], "config.json")) as f:
        assert json.load(f)["quantization_config"]["zero_point"] is False
    for key, method in ((("w4-sym", "auto_round"), "W4A16Method"), (("w4-sym", "auto_awq"), "W4A16Method"),
                        (("w8-sym", "auto_round"), "W8A16Method")):
        llm = LLM(quantized[key], dtype="float32", num_gpu_blocks_override=128, show_progress=False)
        layer = llm.engine.runner.model.model.layers[0].mlp.down_proj
        assert type(layer.quant).__name__ == method, key
        llm.engine.shutdown()


def test_perplexity_of_each_auto_round_scheme(trained, quantized):
    """The corpus's perplexity through each checkpoint over the trained model's. Measured on the CPU:
    4-bit symmetric +8.1%, asymmetric +8.7%, 8-bit -0.08% (AutoRound's optimised round-to-nearest in groups
    of 128, whole rows of this model)."""
    path, ids = trained

    def perplexity(p):
        return float(np.exp(-prompt_logprobs(p, ids).mean()))

    base = perplexity(path)
    ratios = {name: perplexity(quantized[name, "auto_round"]) / base for name in SCHEMES}
    assert ratios["w4-sym"] < 1.12 and ratios["w4-asym"] < 1.12 and ratios["w8-sym"] < 1.002, ratios


@pytest.mark.parametrize("change,what", [({"packing_format": "auto_round:gptqmodel"},
                                          "packed as 'auto_round:gptqmodel'"),
                                         ({"data_type": "nv_fp"}, "auto-round nv_fp"),
                                         ({"act_bits": 8}, "with 8-bit activations"),
                                         ({"extra_config": {"model.layers.0.mlp.down_proj": {"bits": 8}}},
                                          "giving 'model.layers.0.mlp.down_proj' a scheme of its own")])
def test_auto_round_schemes_not_served_are_refused_at_start(quantized, tmp_path, change, what):
    dst = changed_quant_config(quantized["w4-sym", "auto_round"], str(tmp_path / "other"), change)
    with pytest.raises(ValueError, match=f"{what}.*supported: "):
        LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_layers_extra_config_keeps_at_16_bits_stay_whole(trained, quantized, tmp_path):
    """extra_config naming a layer at 16 bits: that layer is read in full precision (here: down_proj of
    layer 0 put back from the trained model), the rest as packed."""
    from safetensors.torch import load_file, save_file
    dst = str(tmp_path / "partial")
    shutil.copytree(quantized["w4-sym", "auto_round"], dst)
    tensors = load_file(f"{dst}/model.safetensors")
    layer = "model.layers.0.mlp.down_proj"
    for last in ("qweight", "qzeros", "scales", "g_idx"):
        tensors.pop(f"{layer}.{last}", None)
    tensors[f"{layer}.weight"] = load_file(f"{trained[0]}/model.safetensors")[f"{layer}.weight"]
    save_file(tensors, f"{dst}/model.safetensors")
    with open(f"{dst}/config.json") as f:
        config = json.load(f)
    config["quantization_config"]["extra_config"] = {layer: {"bits": 16, "data_type": "float"}}
    with open(f"{dst}/config.json", "w") as f:
        json.dump(config, f)
    llm = LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    layers = llm.engine.runner.model.model.layers
    assert layers[0].mlp.down_proj.weight.dtype == torch.float32 and hasattr(layers[1].mlp.down_proj, "qweight")
    llm.engine.shutdown()
