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


def save_dense(tensors: dict, dst: str) -> str:
    """Write a copy's multiplied-out tensors and drop its quantization_config."""
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dst


def dequantized_copy(quantized: str, dst: str, block: int | None = None) -> str:
    """The same model with every 8-bit weight multiplied out in float32 and no quantization_config:
    what transformers runs as the oracle. block: the scales are per block x block tile (the last tiles
    of a weight may cover fewer rows or columns)."""
    shutil.copytree(quantized, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale") or name.endswith(".input_scale"):
            continue
        scale = tensors.get(name[:-len("weight")] + "weight_scale") if name.endswith(".weight") else None
        if scale is not None and block is not None:
            scale = scale.repeat_interleave(block, 0)[:t.shape[0]].repeat_interleave(block, 1)[:, :t.shape[1]]
        elif scale is not None and scale.numel() > 1:
            scale = scale.view(-1, 1)
        out[name] = t.float() * scale if scale is not None else t
    return save_dense(out, dst)


def fp4_dense_copy(quantized: str, dst: str) -> str:
    """An NVFP4 or MXFP4 checkpoint's weights multiplied out in float32 (compressed-tensors' own FP4
    unpacking; NVFP4: w = e2m1 * weight_scale / weight_global_scale in groups of 16, MXFP4: w = e2m1 *
    2^(weight_scale - 127) in groups of 32), without quantization_config: what transformers runs as the
    oracle (it cannot run these files in float32 itself), activations in full precision."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    shutil.copytree(quantized, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            layer = name[:-len(".weight_packed")]
            values = unpack_fp4_from_uint8(t, t.shape[0], 2 * t.shape[1], dtype=torch.float32)
            scale = tensors[layer + ".weight_scale"]
            if layer + ".weight_global_scale" in tensors:
                scale = scale.float() / tensors[layer + ".weight_global_scale"].float()
            else:
                scale = decompress_mx_scale(scale).float()
            out[layer + ".weight"] = values * scale.repeat_interleave(values.shape[1] // scale.shape[1], 1)
        elif not name.endswith(("_scale", "_global_scale")):
            out[name] = t
    return save_dense(out, dst)


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


_AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8 c + _AWQ_PACK_ORDER[i]


def _linear_weights(tensors: dict, out: dict, dense: dict, lm_head: bool = False):
    """(name, layer, tensor) of each linear layer's weight (and the LM head's with lm_head); every other
    tensor copied as it is into both checkpoints being written (out: the quantized one, dense: the
    weights it encodes)."""
    for name, t in tensors.items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and (layer.split(".")[-1] in _LINEARS or (lm_head and layer == "lm_head")):
            yield name, layer, t
        else:
            out[name] = dense[name] = t


def _g_idx(layer: str, k: int, group_size: int, orders: dict, gen: torch.Generator) -> torch.Tensor:
    """Act-order groups: each a scattered set of the k input columns, the same for layers that read
    the same input (GPTQ orders by that input's statistics); orders keeps each input's."""
    key = (layer.rsplit(".", 1)[0], layer.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
           layer.split(".")[-1] in ("gate_proj", "up_proj"))
    if key not in orders:
        orders[key] = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[orders[key]] = torch.arange(k, dtype=torch.int32) // group_size
    return g_idx


def write_4bit_by_hand(src: str, dst: str, method: str, group_size: int = 32, desc_act: bool = False,
                       seed: int = 0, lm_head: bool = False) -> tuple[str, str]:
    """GPTQ (original format), AWQ (GEMM) or compressed-tensors pack-quantized 4-bit checkpoint,
    asymmetric groups, written by hand to the formats' specification (GPTQ's and AWQ's producing
    libraries need a GPU; compressed-tensors' act-order groups, actorder "group" with `weight_g_idx`,
    were removed from its library in 2026 but are in checkpoints made before), and beside it
    (dst + "-dense") the weights it encodes in float32. lm_head: the LM head quantized too (GPTQ's
    lm_head true, compressed-tensors without it in the ignore list)."""
    from sageinfer.ops.weight_only import pack
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out, dense, orders = {}, {}, {}
    for name, layer, t in _linear_weights(tensors, out, dense, lm_head):
        w = t.float()                                   # [N, K]
        n, k = w.shape
        g_idx = _g_idx(layer, k, group_size, orders, gen) if desc_act else torch.arange(k, dtype=torch.int32) // group_size
        groups = k // group_size
        lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(groups)], 1).clamp(max=0)   # [N, G]
        hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(groups)], 1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(1, 15)       # GPTQ's original format stores zero - 1 >= 0
        s_full, z_full = scale[:, g_idx.long()], zero[:, g_idx.long()]
        q = (w / s_full + z_full).round().clamp(0, 15)
        dense[name] = (q - z_full) * s_full
        if method == "compressed-tensors":  # values and zero points stored plus 8, as signed int4
            out[layer + ".weight_packed"] = pack(q.to(torch.int32))                   # [N, K / 8]
            out[layer + ".weight_zero_point"] = pack(zero.t().to(torch.int32)).t().contiguous()  # [N / 8, G]
            out[layer + ".weight_scale"] = scale
            out[layer + ".weight_shape"] = torch.tensor([n, k])
            if desc_act:
                out[layer + ".weight_g_idx"] = g_idx
        elif method == "gptq":
            out[layer + ".qweight"] = pack(q.to(torch.int32)).t().contiguous()       # [K / 8, N]
            out[layer + ".qzeros"] = pack((zero - 1).t().to(torch.int32))            # [G, N / 8]
            out[layer + ".scales"] = scale.t().contiguous().to(torch.float16)
            out[layer + ".g_idx"] = g_idx
            dense[name] = (q - z_full) * s_full.half().float()
        else:
            order = torch.tensor(_AWQ_PACK_ORDER)
            q_kn = q.t().reshape(k, -1, 8)[:, :, order].reshape(k, n)
            z_gn = zero.t().reshape(groups, -1, 8)[:, :, order].reshape(groups, n)
            out[layer + ".qweight"] = pack(q_kn.to(torch.int32))                      # [K, N / 8]
            out[layer + ".qzeros"] = pack(z_gn.to(torch.int32))                       # [G, N / 8]
            out[layer + ".scales"] = scale.t().contiguous().to(torch.float16)
            dense[name] = (q - z_full) * s_full.half().float()
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": False,
                 "checkpoint_format": "gptq", "lm_head": lm_head},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"},
        "compressed-tensors": {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": [] if lm_head else ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                            "group_size": group_size, "actorder": "group" if desc_act else None}}}}}[method]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copytree(src, dst + "-dense")
    save_file(dense, os.path.join(dst + "-dense", "model.safetensors"))
    return dst, dst + "-dense"


def _pack_bytes(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers in [0, 255] -> [rows, cols / 4] int32, the first in the lowest byte."""
    b = values.to(torch.int64).view(values.shape[0], -1, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def write_gptq_8bit(src: str, dst: str, group_size: int = 32, desc_act: bool = False, v2: bool = False,
                    zero: int = 128, symmetric: bool = True, lm_head: bool = False) -> tuple[str, str]:
    """GPTQ 8-bit (the layout of Qwen's GPTQ-Int8 releases), written by hand to the format's
    specification: `qweight` [K / 4, N] four bytes a word along the input, each value q in [0, 255],
    `qzeros` [G, N / 4] (the zero point z, stored z - 1 in the original format), `scales` [G, N] fp16,
    `g_idx` [K] (a scattered set of columns a group with desc_act); w = scale * (q - z). Symmetric: z
    is 128 (zero: another value, written under sym true, a mislabelled checkpoint); else each group's
    range maps onto [0, 255]. lm_head: the LM head quantized too (lm_head true). Beside it
    (dst + "-dense") the weights it encodes in float32."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(8)
    out, dense, orders = {}, {}, {}
    for name, layer, t in _linear_weights(tensors, out, dense, lm_head):
        w = t.float()
        n, k = w.shape
        g_idx = _g_idx(layer, k, group_size, orders, gen) if desc_act else torch.arange(k, dtype=torch.int32) // group_size
        groups = [w[:, g_idx == g] for g in range(k // group_size)]
        if symmetric:
            amax = torch.stack([c.abs().amax(1) for c in groups], 1)                              # [N, G]
            scale = (amax / 127).clamp(min=1e-8).half().float()
            z = torch.full_like(scale, zero)
        else:
            low = torch.stack([c.amin(1) for c in groups], 1).clamp(max=0)
            high = torch.stack([c.amax(1) for c in groups], 1).clamp(min=0)
            scale = ((high - low) / 255).clamp(min=1e-8).half().float()
            z = (-low / scale).round().clamp(0, 255)
        s_full, z_full = scale[:, g_idx.long()], z[:, g_idx.long()]
        q = ((w / s_full).round() + z_full).clamp(0, 255)
        dense[name] = (q - z_full) * s_full
        out[layer + ".qweight"] = _pack_bytes(q).t().contiguous()                               # [K / 4, N]
        zeros = (z.t() - (0 if v2 else 1)).contiguous()
        out[layer + ".qzeros"] = _pack_bytes(zeros)                                              # [G, N / 4]
        out[layer + ".scales"] = scale.t().contiguous().half()
        out[layer + ".g_idx"] = g_idx
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": group_size,
                                     "desc_act": desc_act, "sym": symmetric, "lm_head": lm_head,
                                     "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copytree(src, dst + "-dense")
    save_file(dense, os.path.join(dst + "-dense", "model.safetensors"))
    return dst, dst + "-dense"


def write_fp8_blocks(src: str, dst: str, block: int = 32) -> tuple[str, str]:
    """quant_method "fp8" with weight_block_size [b, b] (the layout of Qwen3's and DeepSeek's FP8
    releases): FP8 `weight` and `weight_scale_inv` per tile; beside it the weights it encodes."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, dense = {}, {}
    for name, layer, t in _linear_weights(tensors, out, dense):
        w = t.float()
        n, k = w.shape
        tiles = w.view(n // block, block, k // block, block)
        scale = tiles.abs().amax(dim=(1, 3)) / 448.0
        q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        out[name] = q.view(n, k)
        out[layer + ".weight_scale_inv"] = scale
        dense[name] = (q.float() * scale[:, None, :, None]).view(n, k)
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copytree(src, dst + "-dense")
    save_file(dense, os.path.join(dst + "-dense", "model.safetensors"))
    return dst, dst + "-dense"


def dummy_weights_dtype(path: str) -> torch.dtype:
    """load_format='dummy' with a quantized checkpoint's config (benchmarks: random weights held as its
    scheme): four tokens generate; the dtype layer 0's q/k/v weight is held in."""
    from sageinfer import LLM, SamplingParams
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, show_progress=False, load_format="dummy")
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    dtype = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype
    llm.engine.shutdown()
    return dtype


def changed_quant_config(src: str, dst: str, change: dict) -> str:
    """A copy of a quantized checkpoint whose quantization_config has these fields changed."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"].update(change)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst
