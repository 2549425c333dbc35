"""What quantization a model is built with: from config.json's `quantization_config` (the format of
the checkpoint), or `quantization="fp8"` / `"int8"` / `"bitsandbytes"` (NF4) on a full-precision checkpoint
(quantized at load time).

Supported: compressed-tensors FP8 W8A8 (per-tensor or per-channel weight scales; dynamic per-token
or static per-tensor activation scales; or square weight blocks with activations per token and block
width), INT8 W8A8 (per-channel symmetric weights, dynamic per-token or static per-tensor activations)
and W4A16 (pack-quantized, per group or channel, symmetric or asymmetric, any actorder), W8A16
(pack-quantized, symmetric or asymmetric), NVFP4 and MXFP4 (their FP4 activations run in 16 bits);
GPTQ 4- and 8-bit, AWQ 4-bit; online FP8 or INT8 (per-channel weights, dynamic per-token activations);
several compressed-tensors config groups, each scheme for the layers its targets name; NVIDIA ModelOpt's
FP8 (per tensor, static activations), FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4 and W4A16_NVFP4
exports, with their FP8 KV cache scales (from config.json or, in older exports, hf_quant_config.json);
Intel AutoRound's own format; bitsandbytes 4-bit (NF4 or FP4) and 8-bit: the last three read in
tool_formats.py.
Anything else is refused at start with what is supported.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field

SUPPORTED = ("compressed-tensors: FP8 W8A8 (weights per tensor, per channel or in square blocks; activations dynamic "
             "per token (per token and block for blocks) or static per tensor), INT8 W8A8 (symmetric weights per "
             "channel, activations dynamic per token or static per tensor), W4A16 pack-quantized (4-bit weights per "
             "group or channel, symmetric or asymmetric, actorder weight/static/group), W8A16 pack-quantized (8-bit "
             "weights per group or channel, symmetric or asymmetric); GPTQ 4- and 8-bit (groups or channel-wise, "
             "desc_act true or false, symmetric or asymmetric); FP4 (nvfp4-pack-quantized and mxfp4-pack-quantized: "
             "NVFP4A16, MXFP4A16, and NVFP4 / MXFP4 whose activations then run in 16 bits); AWQ 4-bit GEMM; fp8 "
             "(block-quantized weights, or per tensor with static or dynamic activations); modelopt: FP8, "
             "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4 (KV cache FP8 or none); auto-round: integer 4- "
             "or 8-bit weights packed as auto_gptq, 4-bit as auto_awq; bitsandbytes: 4-bit NF4 or FP4, 8-bit int8 "
             "rows; quantization='fp8', 'int8' or 'bitsandbytes' (NF4) on a "
             "bf16/fp16/fp32 checkpoint; compressed-tensors config groups of these schemes for different layers (mixed"
             " precision), a merged layer's parts (q/k/v, gate/up) in one group")


@dataclass
class QuantConfig:
    scheme: str                     # "fp8" or "int8" (W8A8), "w4a16", "w8a16" (integer weights only)
    weight_strategy: str            # "tensor" or "channel": the checkpoint's weight scales
    activation_dynamic: bool        # per-token scales at run time; else one static scale per layer
    from_checkpoint: bool           # the checkpoint holds quantized tensors (else: quantize at load)
    ignore: list[str] = field(default_factory=list)  # layer names kept in full precision
    group_size: int | None = None   # w4a16, w8a16: columns per scale (None: one per output channel)
    symmetric: bool = True          # w4a16, w8a16: False when the checkpoint has zero points
    # w4a16, w8a16, fp8-block: the checkpoint's layout (compressed-tensors, gptq, awq, fp8); fp4: nvfp4 or
    # mxfp4; ModelOpt's FP8 W8A8: "modelopt" (its tensors are compressed-tensors' names; the log says which)
    format: str = "compressed-tensors"
    desc_act: bool = False          # gptq, compressed-tensors: input columns out of group order (act-order, g_idx)
    gptq_v2: bool = False           # gptq: zero points stored as they are (not minus one)
    targets: list[str] = field(default_factory=lambda: ["Linear"])  # a compressed-tensors group: its layers
    groups: list[QuantConfig] = field(default_factory=list)  # "mixed": each group's scheme (group_for)
    lm_head: bool = False           # the checkpoint quantizes the LM head too (mixed: the group naming it)
    unquantized_activations: bool = False  # fp4: the checkpoint's FP4 activations run in 16 bits here
    tensor_names: str = "compressed-tensors"  # fp4: "modelopt" for ModelOpt's (weight, weight_scale_2)

    def needs_fp8(self) -> bool:
        """Whether the kernels of this scheme (or of one of its groups) take FP8 e4m3 values: FP8 weights,
        block FP8, and NVFP4's FP8 group scales."""
        return any(part.scheme in ("fp8", "fp8-block") or part._nvfp4() for part in self.groups or [self])

    def dequantizes_without_fp8(self) -> bool:
        """Whether a device without FP8 runs this checkpoint with its FP8 weights multiplied out to 16 bits at
        load (FP8 and block FP8 weights: twice their memory); NVFP4's packed codes are not."""
        return not any(part._nvfp4() for part in self.groups or [self])

    def _nvfp4(self) -> bool:
        return self.scheme == "fp4" and self.format == "nvfp4"

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.groups:
            return "mixed: " + "; ".join(f"{g.targets} {g.describe()}" for g in self.groups)
        parts = [self.scheme, self.format if self.from_checkpoint else "quantized at load time"]
        if self.group_size:
            parts.append(f"groups of {self.group_size}")
        if not self.symmetric:
            parts.append("asymmetric")
        if self.desc_act:
            parts.append("act-order")
        if self.lm_head:
            parts.append("LM head quantized")
        return ", ".join(parts)

    def group_for(self, layer_name: str) -> QuantConfig | None:
        """A mixed checkpoint: the first group whose targets name the checkpoint layer (compressed-tensors'
        rules: "Linear" any linear layer, "re:" a regular expression matched from the name's start, else
        the name or its last parts); None where none does or the layer is ignored (full precision)."""
        if self.ignores(layer_name):
            return None
        for group in self.groups:
            for target in group.targets:
                if target == "Linear" or (re.match(target[3:], layer_name) if target.startswith("re:") else
                                          layer_name == target or layer_name.endswith("." + target)):
                    return group
        return None

    def ignores(self, layer_name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], layer_name):
                    return True
            elif layer_name == pattern or fnmatch.fnmatch(layer_name, pattern) or layer_name.endswith("." + pattern):
                return True
        return False


# vLLM's names for its kernels of a checkpoint's method, which its users pass as --quantization.
OPTION_ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq", "modelopt_fp4": "modelopt"}
OPTIONS = (None, "fp8", "int8", "compressed-tensors", "gptq", "awq", "modelopt", "auto-round", "bitsandbytes",
           *OPTION_ALIASES)


def refuse(what: str) -> ValueError:
    return ValueError(f"{what} is not supported; supported: {SUPPORTED}")


def parse_quant_config(raw: dict | None, option: str | None) -> QuantConfig | None:
    """raw: config.json's quantization_config (None: a full-precision checkpoint); option: the
    user's `quantization` (None: whatever the checkpoint says)."""
    if raw is None:
        if option is None:
            return None
        if option in ("fp8", "int8"):  # INT8 for chips without FP8 matmuls (the domestic ones, A100s)
            return QuantConfig(option, "channel", True, from_checkpoint=False)
        if option == "bitsandbytes":  # NF4 in blocks of 64 at load time, as vLLM's in-flight bitsandbytes
            return QuantConfig("bnb4", "group", False, from_checkpoint=False, group_size=64, format="bitsandbytes")
        raise refuse(f"quantization={option!r} on a full-precision checkpoint")
    method = raw.get("quant_method")
    option = OPTION_ALIASES.get(option, option)
    if option is not None and option != method:
        raise ValueError(f"the checkpoint is quantized with {method!r}; quantization={option!r} does not match it")
    if method in ("gptq", "awq"):
        return parse_gptq_awq(raw, method)
    if method == "fp8":
        return _parse_fp8(raw)
    if method in ("modelopt", "auto-round", "bitsandbytes"):
        from sageinfer.layers.quantization.tool_formats import parse_tool_format
        return parse_tool_format(raw, method)
    if method != "compressed-tensors":
        raise refuse(f"quant_method {method!r}")
    _refuse_run_time_transforms(raw.get("transform_config"))
    sparsity = (raw.get("sparsity_config") or {}).get("format")
    if sparsity not in (None, "dense"):
        raise refuse(f"compressed-tensors sparsity format {sparsity!r}")
    groups = list((raw.get("config_groups") or {}).values())
    if not groups:
        raise refuse("compressed-tensors without config groups")
    if len(groups) == 1 and groups[0].get("targets") == ["Linear"]:
        single = _parse_ct_group(raw, groups[0])
        # "Linear" names the LM head too, unless the ignore list keeps it whole
        return dataclasses.replace(single, lm_head=not single.ignores("lm_head"))
    # mixed precision, or some layers only: each group its scheme, for the layers its targets name
    parsed = [dataclasses.replace(_parse_ct_group(raw, g), targets=list(g.get("targets") or [])) for g in groups]
    mixed = QuantConfig("mixed", "mixed", False, True, list(raw.get("ignore") or []), groups=parsed)
    return dataclasses.replace(mixed, lm_head=mixed.group_for("lm_head") is not None)


def _parse_ct_group(raw: dict, group: dict) -> QuantConfig:
    """One compressed-tensors config group's scheme."""
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    kind, bits = weights.get("type"), weights.get("num_bits")
    if bits in (4, 8) and kind == "int" and acts is None:
        return _parse_weight_only(raw, group, weights, bits)
    if bits == 4 and kind == "float":
        return _parse_fp4(raw, group, weights, acts)
    if bits != 8 or kind not in ("float", "int") or acts is None or acts.get("num_bits") != 8 \
            or acts.get("type") != kind:
        raise refuse(f"compressed-tensors weights {kind} {bits} bit with activations "
                     f"{None if acts is None else (acts.get('type'), acts.get('num_bits'))}")
    if not weights.get("symmetric", True) or (acts and not acts.get("symmetric", True)):
        raise refuse("asymmetric W8A8 compressed-tensors")
    strategy = weights.get("strategy")
    if strategy == "block" and kind == "float":
        return _parse_ct_fp8_block(raw, weights, acts)
    if strategy not in ("tensor", "channel") or (kind == "int" and strategy != "channel"):
        raise refuse(f"compressed-tensors {kind} weights with strategy {strategy!r}")
    dynamic = bool(acts.get("dynamic"))
    if dynamic and acts.get("strategy") != "token":
        raise refuse(f"dynamic activation strategy {acts.get('strategy')!r}")
    if not dynamic and acts.get("strategy") != "tensor":
        raise refuse(f"static {kind} activations with strategy {acts.get('strategy')!r}")
    return QuantConfig("fp8" if kind == "float" else "int8", strategy, dynamic, True, list(raw.get("ignore") or []))


def _refuse_run_time_transforms(transforms: dict | None) -> None:
    """Rotations fused into the weights (SpinQuant's R1 / R2: locations weight_input / weight_output)
    need nothing at run time; ones applied to activations as the model runs (QuIP's online Hadamard
    transforms: input, output, attention, cache) are not supported: without them the answer is wrong."""
    for name, scheme in ((transforms or {}).get("config_groups") or {}).items():
        for args in scheme.get("apply") or []:
            if args.get("location") not in ("weight_input", "weight_output"):
                raise refuse(f"compressed-tensors transform {name!r} applied at run time (location "
                             f"{args.get('location')!r}; transforms fused into the weights are)")


def _parse_ct_fp8_block(raw: dict, weights: dict, acts: dict) -> QuantConfig:
    """compressed-tensors FP8 with b x b weight tiles (llm-compressor's FP8_BLOCK): the same tensors as
    quant_method "fp8" with weight_block_size, the tiles' scales named `weight_scale`."""
    block = weights.get("block_structure") or []
    if len(block) != 2 or block[0] != block[1] or block[0] % 32 or not acts.get("dynamic") \
            or acts.get("strategy") != "group" or acts.get("group_size") != block[0]:
        raise refuse(f"compressed-tensors FP8 blocks {block} with activations "
                     f"{acts.get('strategy')!r} group_size {acts.get('group_size')!r} dynamic {acts.get('dynamic')!r} "
                     "(square blocks, a multiple of 32, activations dynamic per group of the block's width)")
    return QuantConfig("fp8-block", "block", True, True, list(raw.get("ignore") or []), group_size=block[0])


def _parse_fp8(raw: dict) -> QuantConfig:
    """quant_method "fp8": block-quantized weights (weight_block_size), or one scale per tensor with
    static or dynamic activation scales (the older FP8 checkpoints)."""
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static") or raw.get("fmt", "e4m3") != "e4m3":
        raise refuse(f"fp8 with activation_scheme {scheme!r} and fmt {raw.get('fmt')!r}")
    ignore = list(raw.get("ignored_layers") or raw.get("modules_to_not_convert") or [])
    block = raw.get("weight_block_size")
    if block is None:
        return QuantConfig("fp8", "tensor", scheme == "dynamic", True, ignore)
    if len(block) != 2 or block[0] != block[1] or block[0] % 32 or scheme != "dynamic":
        raise refuse(f"fp8 weight_block_size {block} with {scheme} activations (square blocks, a multiple of 32)")
    return QuantConfig("fp8-block", "block", True, True, ignore, group_size=block[0], format="fp8")


def parse_gptq_awq(raw: dict, method: str) -> QuantConfig:
    bits, group = raw.get("bits", raw.get("w_bit")), raw.get("group_size", raw.get("q_group_size"))
    if bits != 4 and (method, bits) != ("gptq", 8):
        raise refuse(f"{method} with {bits} bits")
    if group in (-1, None):
        group = None
    elif not isinstance(group, int) or group % 32:
        raise refuse(f"{method} with group_size {group!r} (a multiple of 32, or -1)")
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise refuse(f"AWQ version {version!r} (GEMM)")
        # (zero_point false, as AutoRound's symmetric export: its qzeros hold 8, read as they are)
        return QuantConfig("w4a16", "group", False, True, ignore=list(raw.get("modules_to_not_convert") or []),
                           group_size=group, symmetric=False, format="awq")
    fmt = raw.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise refuse(f"GPTQ checkpoint_format {fmt!r}")
    return QuantConfig(f"w{bits}a16", "group", False, True, group_size=group,
                       symmetric=bool(raw.get("sym", True)), format="gptq", desc_act=bool(raw.get("desc_act", False)),
                       gptq_v2=fmt == "gptq_v2", lm_head=bool(raw.get("lm_head", False)))


def _parse_weight_only(raw: dict, group: dict, weights: dict, bits: int) -> QuantConfig:
    """pack-quantized integer weights with 16-bit activations: W4A16 or W8A16."""
    fmt = group.get("format") or raw.get("format")  # a mixed-precision checkpoint names it per group
    if fmt not in (None, "pack-quantized"):
        raise refuse(f"compressed-tensors {bits}-bit format {fmt!r}")
    strategy, actorder = weights.get("strategy"), weights.get("actorder")
    # "weight" / "static": the order GPTQ quantized in, groups still in column order; "group" / "dynamic":
    # groups in activation order, each column's group in `weight_g_idx` (as GPTQ's desc_act)
    if strategy not in ("group", "channel") or actorder not in (None, False, "static", "weight", "group", "dynamic") \
            or (strategy == "channel" and actorder in ("group", "dynamic")):
        raise refuse(f"{bits}-bit weights with strategy {strategy!r} and actorder {actorder!r}")
    group = weights.get("group_size") if strategy == "group" else None
    if strategy == "group" and (not isinstance(group, int) or group % 32):
        raise refuse(f"{bits}-bit weights with group_size {group!r} (a multiple of 32)")
    return QuantConfig(f"w{bits}a16", strategy, activation_dynamic=False, from_checkpoint=True,
                       ignore=list(raw.get("ignore") or []), group_size=group,
                       symmetric=bool(weights.get("symmetric", True)), desc_act=actorder in ("group", "dynamic"))


def _parse_fp4(raw: dict, group: dict, weights: dict, acts: dict | None) -> QuantConfig:
    """FP4 e2m1 weights: NVFP4 (groups of 16, FP8 scales, a global scale) or MXFP4 (groups of 32, E8M0
    scales); their FP4 activations run in 16 bits (layers/quantization/fp4.py)."""
    fmt = group.get("format") or raw.get("format")
    expected = {"nvfp4-pack-quantized": ("tensor_group", 16), "mxfp4-pack-quantized": ("group", 32)}.get(fmt)
    if expected is None or (weights.get("strategy"), weights.get("group_size")) != expected \
            or not weights.get("symmetric", True):
        raise refuse(f"compressed-tensors FP4 weights in format {fmt!r} with strategy {weights.get('strategy')!r} "
                     f"and group_size {weights.get('group_size')!r}")
    if acts is not None and (acts.get("type"), acts.get("num_bits")) != ("float", 4):
        raise refuse(f"FP4 weights with activations {(acts.get('type'), acts.get('num_bits'))}")
    return QuantConfig("fp4", "group", False, True, ignore=list(raw.get("ignore") or []), group_size=expected[1],
                       format=fmt.split("-")[0], unquantized_activations=acts is not None)


def load_quant_config(model_dir: str, option: str | None) -> QuantConfig | None:
    """config.json's quantization_config, or an older ModelOpt export's hf_quant_config.json where the
    config has none."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f).get("quantization_config")
    modelopt = os.path.join(model_dir, "hf_quant_config.json")
    if raw is None and os.path.exists(modelopt):
        with open(modelopt) as f:
            raw = {"quant_method": "modelopt", **(json.load(f).get("quantization") or {})}
    return parse_quant_config(raw, option)


# The config of the model being built: linear layers read it when they create their tensors, as they
# read the tensor-parallel group.
_CURRENT: QuantConfig | None = None


def set_quant_config(config: QuantConfig | None) -> None:
    global _CURRENT
    _CURRENT = config


def get_quant_config() -> QuantConfig | None:
    return _CURRENT
