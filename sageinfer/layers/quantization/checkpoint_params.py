"""What the weight-only methods share: tensors registered under a checkpoint's names whose loaders
convert the checkpoint's layout, and the column order of groups in activation order (g_idx)."""
from __future__ import annotations

import torch
from torch import nn


def checkpoint_param(layer: nn.Module, name: str, tensor: torch.Tensor, convert) -> None:
    """A parameter under the checkpoint's name whose loader converts the checkpoint's layout. convert:
    a function of the whole checkpoint tensor; None: nothing to load (known already, or not needed;
    the checkpoint may lack it); "keep": loaded as it is, the same for every part of a merged layer
    (g_idx: parts read one input)."""
    param = nn.Parameter(tensor, requires_grad=False)
    setattr(layer, name, param)
    if convert is None:  # (a checkpoint may lack it too)
        param.weight_loader = lambda p, loaded, shard_id=None: None
        param.optional = True
    elif convert == "keep":
        def keep(p, loaded, shard_id=None):
            if getattr(p, "loaded", False) and not torch.equal(p.data, loaded.to(p.device, p.dtype)):
                raise ValueError("g_idx differs between parts of a merged layer (q/k/v or gate/up)")
            p.data.copy_(loaded)
            p.loaded = True
        param.weight_loader = keep
    else:
        param.weight_loader = lambda p, loaded, shard_id=None: layer.weight_loader(
            p, convert(loaded).contiguous().to(p.dtype), shard_id)


def g_idx_param(layer: nn.Module, name: str | None, desc_act: bool, local_in: int, what: str) -> None:
    """Each input column's group under the checkpoint's name (None: the checkpoint holds none). Only
    groups in activation order are read; those never split a layer's input over ranks (a row-parallel
    layer splits its outputs instead: layers/linear.py)."""
    if desc_act and layer.parallel == "row":  # (layers/linear.py's _split sees to it)
        raise AssertionError(f"{what} in act-order on a layer whose input is split over ranks")
    if name is not None:
        checkpoint_param(layer, name, torch.zeros(local_in, dtype=torch.int32), "keep" if desc_act else None)


def group_order(g_idx: torch.Tensor, group: int, name: str) -> torch.Tensor | None:
    """The input columns ordered by group (each group's columns together), or None where they are
    in order already; every group must hold `group` columns."""
    g_idx = g_idx.long()
    if bool((torch.bincount(g_idx) != group).any()):
        raise ValueError(f"{name} does not give every group the same number of columns")
    order = torch.argsort(g_idx, stable=True)
    return None if torch.equal(order, torch.arange(len(order), device=order.device)) else order


def ordered_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features], its columns in the layer's group order where act-order moved them."""
    x2 = x.reshape(-1, x.shape[-1])
    order = getattr(layer, "input_order", None)
    return x2 if order is None else x2.index_select(1, order)
