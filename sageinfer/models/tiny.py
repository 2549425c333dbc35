"""Tiny random models in Hugging Face format, with a small trained byte-level BPE tokenizer.

Used by the tests (transformers' forward pass on the same files is the oracle) and as the default
model of `sageinfer generate` on machines with no real checkpoint: the weights are random, so the
text is gibberish, but every code path of a real model runs.
"""
from __future__ import annotations

import os

_CORPUS = [
    "Hello, my name is Sage and I serve language models quickly.",
    "The capital of France is Paris. The capital of China is Beijing.",
    "Large language model inference needs a paged KV cache and continuous batching.",
    "你好，世界！今天天气很好。我们一起学习大语言模型的推理。",
    "北京是中国的首都，上海是最大的城市。",
    "Once upon a time, there was a small model that wanted to generate text.",
    "def hello():\n    return 'world'\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: ! ? , . ; : - + = ( ) [ ] { }",
]
# Qwen's shape, tools and thinking included: tools listed in a system turn, calls as Hermes <tool_call> blocks,
# an assistant's earlier thinking as a <think> block; enable_thinking true opens a block for the reply, false
# closes an empty one (Qwen3's switch), and unset leaves the reply as it is.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>\n{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined %}"
    "{% if enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # one token each, not special (kept in the text), as in Qwen3's vocabulary


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


_CONFIGS = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
}


def build_tiny_model(path: str, arch: str = "llama", seed: int = 0, vocab_size: int = 512,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     max_position_embeddings: int = 1024, tie_word_embeddings: bool = False,
                     **extra) -> str:
    """Write config, random safetensors weights and a tokenizer to path; returns path."""
    import torch
    import transformers

    tokenizer = build_tokenizer()
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    config_cls = getattr(transformers, _CONFIGS[arch])
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    if arch == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default weights make the random model's distributions peaked, so greedy
    # decisions are well separated and tests of them are not decided by rounding.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.08 if param.dim() > 1 else 0.02)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def default_model_path() -> str:
    """The cached tiny model used when no --model is given; built on first use."""
    root = os.path.join(os.path.expanduser("~"), ".cache", "sageinfer", "tiny-llama")
    if not os.path.isfile(os.path.join(root, "config.json")):
        build_tiny_model(root, "llama")
    return root
