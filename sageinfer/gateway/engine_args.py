"""Engine flags for every CLI command that builds an engine, derived from EngineConfig's fields
(vLLM's names: --max-num-seqs, --no-enable-prefix-caching, --enforce-eager ...)."""
from __future__ import annotations

import argparse
import dataclasses

from sageinfer.config import EngineConfig


def _flag_type(annotation: str) -> type:
    """int, float, str or bool from a field's annotation, read as text (optional or not; a torch.dtype
    is given as text), so that building the flags imports no torch."""
    names = {part.strip() for part in annotation.split("|")}
    for kind in (bool, int, float):
        if kind.__name__ in names:
            return kind
    return str


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", required=model_required, default=None,
                   help="HF model directory (default: a tiny random model built and cached on first use)")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        flags, kind = ["--" + f.name.replace("_", "-")], _flag_type(str(f.type))
        if f.name == "tensor_parallel_size":
            flags.append("-tp")  # vLLM's short form
        help_text = f.metadata.get("help")
        if kind is bool:
            g.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            g.add_argument(*flags, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_text)
    g.add_argument("--attention-backend", default=None, choices=["torch_ref", "triton"])


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from parsed flags: every EngineConfig field, and the attention backend."""
    from sageinfer.models.tiny import default_model_path
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    return dict(model=args.model or default_model_path(), attention_backend=args.attention_backend, **kwargs)
