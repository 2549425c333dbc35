"""Config spellings, sharded checkpoints, dummy weights."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from sageinfer import LLM, SamplingParams
from sageinfer.models.model_config import load_model_config
from oracle import assert_greedy_matches_hf

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 128}


def _rewrite_config(model_dir, edit):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    edit(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


def test_rope_parameters_and_rope_scaling_spellings_read_the_same(tmp_path, llama_dir):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(llama_dir, a)
    shutil.copytree(llama_dir, b)

    def old_style(raw):
        raw.pop("rope_parameters", None)
        raw["rope_theta"] = 500000.0
        raw["rope_scaling"] = dict(LLAMA3_SCALING)
        raw["torch_dtype"] = raw.pop("dtype", "float32")

    def new_style(raw):
        raw.pop("rope_scaling", None)
        raw.pop("rope_theta", None)
        raw["rope_parameters"] = dict(LLAMA3_SCALING, rope_theta=500000.0)

    _rewrite_config(a, old_style)
    _rewrite_config(b, new_style)
    ca, cb = load_model_config(a), load_model_config(b)
    assert (ca.rope_theta, ca.rope_scaling["rope_type"]) == (cb.rope_theta, cb.rope_scaling["rope_type"]) == (500000.0, "llama3")
    assert ca.rope_scaling["factor"] == cb.rope_scaling["factor"] == 8.0


def test_sharded_checkpoint_loads_and_matches_transformers(tmp_path, model_dirs):
    src, dst = model_dirs["qwen3"], str(tmp_path / "sharded")
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    llm = LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    prompt = [4, 8, 15, 16, 23, 42]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert_greedy_matches_hf(src, prompt, out.token_ids)


def test_dummy_weights_need_no_checkpoint(tmp_path):
    d = str(tmp_path / "cfg")
    os.makedirs(d)
    _small_config(d)
    llm = LLM(d, dtype="float32", load_format="dummy", skip_tokenizer_init=True, num_gpu_blocks_override=80,
              show_progress=False)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4


def test_the_layers_share_one_rope_table(tmp_path):
    """Every layer reads the same cos/sin table, held once: per layer, 131,072 positions of Llama-3.1 took
    64 MiB each (5 GiB of a 70B model's 80 layers, on a card where its FP8 weights leave 6)."""
    d = str(tmp_path / "cfg")
    os.makedirs(d)
    _small_config(d)
    llm = LLM(d, dtype="float32", load_format="dummy", skip_tokenizer_init=True, num_gpu_blocks_override=80,
              show_progress=False)
    model = llm.engine.runner.model
    tables = [layer.self_attn.attn.rotary_emb.cos_sin_cache for layer in model.model.layers]
    assert len(tables) > 1 and all(t.data_ptr() == tables[0].data_ptr() for t in tables)
    assert [n for n, _ in model.named_buffers() if n.endswith("cos_sin_cache")] == \
        ["model.layers.0.self_attn.attn.rotary_emb.cos_sin_cache"]
    llm.engine.shutdown()


_TINY_CONFIGS = {"LlamaConfig": {}, "MistralConfig": {"sliding_window": None}, "Qwen2Config": {},
                 "Qwen3Config": {"head_dim": 24}}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("config_name", sorted(_TINY_CONFIGS))
def test_dummy_checkpoint_names_and_shapes_are_transformers_state_dict(tmp_path, config_name, tied):
    """Dummy weights take the checkpoint's names and shapes from the config; transformers' model for the same
    config (built on the meta device) holds exactly those tensors, in the same order."""
    import torch
    import transformers

    from sageinfer.models.registry import get_model_class
    config = getattr(transformers, config_name)(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, architectures=[config_name.replace("Config", "ForCausalLM")],
        **_TINY_CONFIGS[config_name])
    config.save_pretrained(tmp_path)
    cfg = load_model_config(str(tmp_path))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    expected = [(name, tuple(t.shape)) for name, t in reference.state_dict().items()]
    assert list(get_model_class(cfg.architecture).checkpoint_shapes(cfg).items()) == expected


@pytest.mark.parametrize("model", ["qwen3-8b", "llama-3.1-8b"])
def test_dummy_checkpoint_of_the_benchmark_configs_is_transformers_state_dict(model):
    import torch
    import transformers

    from sageinfer.bench.workloads import STANDARD_DIR
    from sageinfer.models.registry import get_model_class
    path = os.path.join(STANDARD_DIR, model)
    cfg = load_model_config(path)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    expected = [(name, tuple(t.shape)) for name, t in reference.state_dict().items()]
    assert list(get_model_class(cfg.architecture).checkpoint_shapes(cfg).items()) == expected


def _small_config(d):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "vocab_size": 100, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "torch_dtype": "bfloat16", "eos_token_id": 1}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return os.path.join(d, "config.json")


def test_missing_weights_and_unknown_architectures_are_clear_errors(tmp_path, llama_dir):
    d = str(tmp_path / "noweights")
    shutil.copytree(llama_dir, d)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(d, num_gpu_blocks_override=128, show_progress=False)
    _rewrite_config(d, lambda raw: raw.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="not supported"):
        LLM(d, num_gpu_blocks_override=128, show_progress=False)
