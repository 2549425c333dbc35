from __future__ import annotations

from sageinfer.models.llama import LlamaForCausalLM

# Qwen2/Qwen3/Mistral differ from Llama only in flags that ModelConfig carries (bias, q/k norm).
_MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {', '.join(_MODELS)}")
    return _MODELS[architecture]
