"""Quantized checkpoints in their on-disk formats, written from a full-precision tiny model."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_compressed_tensors(src: str, dst: str, scheme: str = "fp8", weight_strategy: str = "channel",
                             dynamic: bool = True, ignore: tuple[str, ...] = ("lm_head",),
                             input_scale: float = 0.05, config_ignore: tuple[str, ...] | None = None) -> str:
    """compressed-tensors W8A8, as llm-compressor writes it: 8-bit `weight`, `weight_scale` ([out, 1]
    per channel or [1] per tensor) and, for static activations, `input_scale` ([1]). ignore: the
    layers left in full precision; config_ignore: how the config names them (patterns allowed)."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(dst, name))
    tensors = {}
    for name in sorted(n for n in os.listdir(src) if n.endswith(".safetensors")):
        tensors.update(load_file(os.path.join(src, name)))
    qmax, qdtype = (448.0, torch.float8_e4m3fn) if scheme == "fp8" else (127.0, torch.int8)
    out = {}
    for name, t in tensors.items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer.split(".")[-1] in _LINEARS and not any(
                layer == i or layer.endswith("." + i) for i in ignore):
            w = t.float()
            amax = w.abs().amax(dim=1, keepdim=True) if weight_strategy == "channel" else w.abs().amax().view(1)
            scale = amax.clamp(min=1e-12) / qmax
            q = (w / (scale if weight_strategy == "channel" else scale.view(1, 1))).clamp(-qmax, qmax)
            out[name] = q.round().to(qdtype) if scheme == "int8" else q.to(qdtype)
            out[layer + ".weight_scale"] = scale.to(torch.float32)
            if not dynamic:
                out[layer + ".input_scale"] = torch.tensor([input_scale], dtype=torch.float32)
        else:
            out[name] = t
    save_file(out, os.path.join(dst, "model.safetensors"))
    kind = "float" if scheme == "fp8" else "int"
    acts = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": dynamic,
            "strategy": "token" if dynamic else "tensor"}
    config_path = os.path.join(dst, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized" if kind == "float" else "int-quantized",
        "quantization_status": "compressed",
        "ignore": list(ignore if config_ignore is None else config_ignore),
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": acts, "output_activations": None,
                                      "weights": {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False,
                                                  "strategy": weight_strategy}}}}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    return dst


def dequantized_copy(quantized: str, dst: str) -> str:
    """The same model with every 8-bit weight multiplied out in float32 and no quantization_config:
    what transformers runs as the oracle."""
    shutil.copytree(quantized, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale") or name.endswith(".input_scale"):
            continue
        scale = tensors.get(name[:-len("weight")] + "weight_scale") if name.endswith(".weight") else None
        out[name] = t.float() * (scale.view(-1, 1) if scale.numel() > 1 else scale) if scale is not None else t
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dst


def write_w4a16(src: str, dst: str, group_size: int | None = 32, symmetric: bool = True) -> tuple[str, str]:
    """compressed-tensors W4A16 (pack-quantized) made by the compressed-tensors library itself, and
    beside it (dst + "-dense") the same model with the weights it encodes, in float32."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    dense_modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "weight_scale"):
                continue
            w = module.weight.data
            grouped = w.view(w.shape[0], -1, group_size or w.shape[1])
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero)
            dense_modules[name].weight.data.copy_(fake_quantize(
                w, scale, getattr(module, "weight_zero_point", None), args))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for model_, path in ((model, dst), (dense, dst + "-dense")):
        model_.save_pretrained(path)
        for name in os.listdir(src):
            if name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(src, name), path)
    compressor.update_config(dst)
    return dst, dst + "-dense"
