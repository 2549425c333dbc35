"""sageInfer: a high-performance LLM inference and serving engine."""
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

# Imported on first use, so that `sageinfer --help` and the server's front end start without torch.
_LAZY = {"LLM": "sageinfer.llm", "SamplingParams": "sageinfer.sampling_params",
         "RequestOutput": "sageinfer.outputs", "CompletionOutput": "sageinfer.outputs"}

if TYPE_CHECKING:  # pragma: no cover
    from sageinfer.llm import LLM  # noqa: F401
    from sageinfer.outputs import CompletionOutput, RequestOutput  # noqa: F401
    from sageinfer.sampling_params import SamplingParams  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sageinfer' has no attribute {name!r}")
