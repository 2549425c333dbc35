import os

# Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported.
try:
    import torch
    _HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_GPU = False
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from sageinfer.models.tiny import build_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """One tiny random model per architecture; Qwen2 with tied embeddings as its small sizes have."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_tiny_model(str(root / "llama"), "llama",
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
        "mistral": build_tiny_model(str(root / "mistral"), "mistral", seed=1),
        "qwen2": build_tiny_model(str(root / "qwen2"), "qwen2", seed=2, tie_word_embeddings=True),
        "qwen3": build_tiny_model(str(root / "qwen3"), "qwen3", seed=3),
    }


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny llama trained briefly on the corpus (tests/trained_model.py) and the corpus's token ids, for the
    quantization formats' tests; hidden size 128: groups of 128 columns fit every layer."""
    from trained_model import build_trained_model, corpus_token_ids
    path = build_trained_model(str(tmp_path_factory.mktemp("trained") / "dense"), steps=10, hidden_size=128)
    return path, corpus_token_ids(path)
