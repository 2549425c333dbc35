"""Quantization configs that other tools write, each read as the scheme of this package it equals (the
layers then take that scheme's methods and kernels): NVIDIA ModelOpt's exports, Intel AutoRound's own
format, bitsandbytes' 4- and 8-bit checkpoints. config.parse_quant_config sends them here by quant_method."""
from __future__ import annotations

import dataclasses

from sageinfer.layers.quantization.config import QuantConfig, parse_gptq_awq, refuse


def parse_tool_format(raw: dict, method: str) -> QuantConfig:
    return {"modelopt": _parse_modelopt, "auto-round": _parse_auto_round,
            "bitsandbytes": _parse_bitsandbytes}[method](raw)


# ModelOpt's quant_algo -> (scheme, weight strategy, activations dynamic), for the algorithms served here
_MODELOPT = {"FP8": ("fp8", "tensor", False), "FP8_PER_CHANNEL_PER_TOKEN": ("fp8", "channel", True),
             "FP8_PB_WO": ("fp8-block", "block", False), "NVFP4": ("fp4", "group", False),
             "W4A16_NVFP4": ("fp4", "group", False)}


def _parse_modelopt(raw: dict) -> QuantConfig:
    """An NVIDIA ModelOpt export (quant_method "modelopt", or hf_quant_config.json's "quantization"):
    - FP8: `weight` e4m3 with one `weight_scale` and one static `input_scale` a layer;
    - FP8_PER_CHANNEL_PER_TOKEN: a `weight_scale` per output row, activations scaled per token at run time;
    - FP8_PB_WO: a `weight_scale` per 128 x 128 tile ([out / 128, 1, in / 128, 1]), activations left in 16 bits;
    - NVFP4 / W4A16_NVFP4: `weight` uint8 of two e2m1 a byte, an FP8 `weight_scale` per 16 inputs and a
      `weight_scale_2` a tensor (w = e2m1 * scale * scale_2); NVFP4's FP4 activations run in 16 bits, as
      compressed-tensors' NVFP4 do (layers/quantization/fp4.py).
    A KV cache quantized to FP8 leaves `k_proj.k_scale` / `v_proj.v_scale` a layer (models/llama.py)."""
    algo = str(raw.get("quant_algo")).upper()
    kv = raw.get("kv_cache_quant_algo")
    if algo not in _MODELOPT or kv not in (None, "FP8"):
        raise refuse(f"modelopt quant_algo {raw.get('quant_algo')!r} with kv_cache_quant_algo {kv!r}")
    scheme, strategy, dynamic = _MODELOPT[algo]
    ignore = list(raw.get("exclude_modules") or raw.get("ignore") or [])
    if scheme == "fp8-block":  # the tiles' scales named as compressed-tensors names them
        config = QuantConfig(scheme, strategy, dynamic, True, ignore, group_size=128)
    elif scheme != "fp4":
        config = QuantConfig(scheme, strategy, dynamic, True, ignore, format="modelopt")
    else:
        if raw.get("group_size", 16) != 16:
            raise refuse(f"modelopt {algo} with group_size {raw.get('group_size')!r} (16)")
        config = QuantConfig("fp4", "group", False, True, ignore, group_size=16, format="nvfp4",
                             unquantized_activations=algo == "NVFP4", tensor_names="modelopt")
    return dataclasses.replace(config, lm_head=not config.ignores("lm_head"))


def _parse_auto_round(raw: dict) -> QuantConfig:
    """Intel AutoRound's own format (quant_method "auto-round"): integer weights packed as GPTQ packs them
    (packing_format auto_round:auto_gptq, zero points stored minus one, no g_idx) or as AWQ does
    (auto_round:auto_awq); 4 or 8 bits (AWQ: 4), groups or channel-wise, symmetric or not; 16-bit
    activations. Layers extra_config leaves at 16 bits stay in full precision; other per-layer schemes are
    refused."""
    packing = raw.get("packing_format", "auto_round:auto_gptq")
    bits, act_bits = raw.get("bits"), raw.get("act_bits", 16)
    method = {"auto_round:auto_gptq": "gptq", "auto_round:auto_awq": "awq"}.get(packing)
    if method is None or raw.get("data_type", "int") != "int" or act_bits < 16 or bits not in (4, 8) \
            or (method, bits) == ("awq", 8):
        raise refuse(f"auto-round {raw.get('data_type', 'int')} {bits}-bit weights with {act_bits}-bit activations "
                     f"packed as {packing!r} (int 4 or 8 bits as auto_gptq, 4 as auto_awq, 16-bit activations)")
    full_precision = []
    for layer, scheme in (raw.get("extra_config") or {}).items():
        if scheme.get("bits", bits) < 16:
            raise refuse(f"auto-round extra_config giving {layer!r} a scheme of its own ({scheme})")
        full_precision.append(layer)
    sym = bool(raw.get("sym", True))
    gptq = parse_gptq_awq({"bits": bits, "group_size": raw.get("group_size"), "sym": sym,
                          "zero_point": not sym}, method)
    return dataclasses.replace(gptq, ignore=gptq.ignore + full_precision, lm_head=False)


def _parse_bitsandbytes(raw: dict) -> QuantConfig:
    """bitsandbytes checkpoints saved 4-bit (NF4 or FP4, with or without double quantization; their 16
    values come with each layer: layers/quantization/bnb4.py) or 8-bit (LLM.int8's int8 rows with their
    absmax: read as 8-bit weight-only, layers/quantization/w8a16.py); the layers it skips stay in full
    precision."""
    ignore = list(raw.get("llm_int8_skip_modules") or [])
    if raw.get("load_in_8bit") and not raw.get("load_in_4bit") and not raw.get("llm_int8_has_fp16_weight"):
        return QuantConfig("w8a16", "channel", False, True, ignore=ignore, format="bitsandbytes")
    if not raw.get("load_in_4bit") or raw.get("bnb_4bit_quant_type", "fp4") not in ("nf4", "fp4") \
            or raw.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise refuse(f"bitsandbytes with load_in_4bit {raw.get('load_in_4bit')!r}, load_in_8bit "
                     f"{raw.get('load_in_8bit')!r} (16-bit weights kept: {raw.get('llm_int8_has_fp16_weight')!r}), "
                     f"quant type {raw.get('bnb_4bit_quant_type')!r} and storage {raw.get('bnb_4bit_quant_storage')!r} "
                     "(4-bit NF4 or FP4 in uint8, or 8-bit int8 rows)")
    return QuantConfig("bnb4", "group", False, True, ignore=ignore, group_size=64, format="bitsandbytes")
