"""sageInfer: a high-performance LLM inference and serving engine."""
from sageinfer.llm import LLM
from sageinfer.outputs import CompletionOutput, RequestOutput
from sageinfer.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
