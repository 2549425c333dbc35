"""Build a model on its device and fill it from safetensors (one tensor at a time) or randomly."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from sageinfer.attention.backend import AttentionBackend
from sageinfer.models.model_config import ModelConfig
from sageinfer.models.registry import get_model_class


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


def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    # Small uniform values keep activations finite through many layers, like real checkpoints.
    gen = torch.Generator().manual_seed(seed)  # host-side draws, copied to the device
    for param in model.parameters():
        host = torch.empty(param.shape, dtype=torch.float32).uniform_(-1e-3, 1e-3, generator=gen) \
            if param.numel() < (1 << 24) else None
        if host is not None:
            param.data.copy_(host)
        else:  # big tensors are filled on the device to keep start-up quick
            param.data.uniform_(-1e-3, 1e-3)


def load_model(cfg: ModelConfig, model_dir: str, load_format: str, dtype: torch.dtype,
               device: torch.device, backend: AttentionBackend, seed: int = 0,
               show_progress: bool = True) -> torch.nn.Module:
    model_cls = get_model_class(cfg.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg, backend)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        _fill_dummy(model, seed)
    else:
        loaded = model.load_weights(iterate_safetensors(model_dir, show_progress))
        expected = {n for n, _ in model.named_parameters()}
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint in {model_dir!r} lacks weights: {sorted(missing)[:5]}...")
    return model.eval()
