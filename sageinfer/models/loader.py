"""Build a model on its device and fill it from safetensors (one tensor at a time) or randomly."""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from sageinfer.attention.backend import AttentionBackend
from sageinfer.layers.linear import Linear
from sageinfer.layers.quantization.config import load_quant_config, set_quant_config
from sageinfer.models.model_config import ModelConfig
from sageinfer.models.registry import get_model_class

logger = logging.getLogger(__name__)


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir!r} (use load_format='dummy' for random weights)")
    return files


def iterate_safetensors(model_dir: str, show_progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so host memory holds one tensor, not the model."""
    files = _safetensors_files(model_dir)
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            total += len(list(f.keys()))
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def _holds_quantized_lm_head(model_dir: str) -> bool:
    """Whether the checkpoint holds LM head tensors other than a full-precision weight and bias (names
    only: no tensor is read)."""
    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            if any(n.startswith("lm_head.") and n not in ("lm_head.weight", "lm_head.bias") for n in f.keys()):
                return True
    return False


def dummy_checkpoint(cfg: ModelConfig, seed: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Random tensors under the checkpoint's own names and shapes (the model class's checkpoint_shapes), each
    drawn whole from a generator seeded by its name. They go through the same loaders as real weights, so every
    tensor-parallel size holds shards of the same model and generates the same tokens."""
    import zlib

    for name, shape in get_model_class(cfg.architecture).checkpoint_shapes(cfg).items():
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        # Small uniform values keep activations finite through many layers, like real checkpoints.
        yield name, torch.empty(shape, dtype=torch.float32, device=device).uniform_(-1e-3, 1e-3, generator=gen)


def load_model(cfg: ModelConfig, model_dir: str, load_format: str, dtype: torch.dtype,
               device: torch.device, backend: AttentionBackend, seed: int = 0,
               show_progress: bool = True, quantization: str | None = None,
               on_built: Callable[[torch.nn.Module], None] | None = None,
               phases: Callable[[str], None] | None = None) -> torch.nn.Module:
    """The model of cfg with its weights (on_built(model): called once its layers exist, before their
    weights load; phases(name): called as "built", "weights" and "converted" end, for start-up's timings)."""
    phases = phases or (lambda name: None)
    quant = load_quant_config(model_dir, quantization)
    if quant is not None and quant.lm_head and not (
            _holds_quantized_lm_head(model_dir) if load_format != "dummy" else not cfg.tie_word_embeddings):
        quant = dataclasses.replace(quant, lm_head=False)  # the config names the head; the checkpoint kept it whole
    if quant is not None:
        logger.info("quantization: %s", quant.describe())
        if any(q.unquantized_activations for q in [quant, *quant.groups]):
            logger.warning("the checkpoint's FP4 activations run in 16 bits here (no FP4 matmul on this engine's "
                           "chips): its weights run as they are, its activations are not rounded to FP4")
    if quant is not None and load_format == "dummy":  # random full-precision weights, quantized as loaded
        def at_load(q):  # (8-bit weight-only keeps its zero points: W8A16's _quantize makes them; block FP8
            # whether its activations are quantized)
            return dataclasses.replace(q, from_checkpoint=False, weight_strategy="channel",
                                       activation_dynamic=q.activation_dynamic if q.scheme == "fp8-block" else True,
                                       symmetric=q.symmetric if q.scheme == "w8a16" else True)
        quant = dataclasses.replace(at_load(quant), groups=[at_load(g) for g in quant.groups])
    model_cls = get_model_class(cfg.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    set_quant_config(quant)
    try:
        with torch.device(device):
            model = model_cls(cfg, backend)
            if quant is not None:
                _quantize_layers_by_name(model, quant)
    finally:
        set_quant_config(None)
        torch.set_default_dtype(previous)
    phases("built")
    if on_built is not None:
        on_built(model)
    weights = dummy_checkpoint(cfg, seed, device) if load_format == "dummy" \
        else iterate_safetensors(model_dir, show_progress)
    if quant is not None and quant.scheme == "bnb4" and quant.from_checkpoint:  # (8-bit ones load as they are)
        from sageinfer.layers.quantization.bnb4 import checkpoint_stream
        weights = checkpoint_stream(weights)  # each 4-bit layer's pieces as the layer holds them
    # (named before loading: layers quantized after loading convert, and rename their tensors, as they load)
    expected = {n for n, p in model.named_parameters() if not getattr(p, "optional", False)}
    with torch.no_grad():
        loaded = model.load_weights(weights)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint in {model_dir!r} lacks weights: {sorted(missing)[:5]}...")
        phases("weights")
        for module in model.modules():
            if isinstance(module, Linear):
                module.process_after_loading()
        phases("converted")
    return model.eval()


# Merged layers and the checkpoint layers they hold (ignore lists name the checkpoint's).
_MERGED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _quantize_layers_by_name(model: torch.nn.Module, quant) -> None:
    """What the checkpoint says of each layer by its name: the ignored stay in full precision; in a
    mixed checkpoint each takes the scheme of the group whose targets name it."""
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        head, _, last = name.rpartition(".")
        parts = [f"{head}.{p}" for p in _MERGED_PARTS.get(last, (last,))]
        if quant.groups:
            chosen = [quant.group_for(p) for p in parts]
            if any(c is not chosen[0] for c in chosen):
                raise ValueError(f"the checkpoint quantizes {parts} with different schemes; they are one layer here")
            if chosen[0] is not None:
                module.set_quantization(chosen[0])
            continue
        if module.quant is None:
            continue
        ignored = [quant.ignores(p) for p in parts]
        if all(ignored):
            module.drop_quantization()
        elif any(ignored):
            raise ValueError(f"the checkpoint quantizes some of {parts} but not all; they are one layer here")
