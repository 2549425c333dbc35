"""bitsandbytes checkpoints as transformers saves them (BitsAndBytesConfig(load_in_4bit=True) or
load_in_8bit=True, then save_pretrained): a tiny llama trained on the tokenizer's corpus, in NF4 with double
quantization, in FP4 without, and in LLM.int8's 8-bit rows. Oracles: transformers on the weights
bitsandbytes' own dequantize_4bit / int8_vectorwise_dequant decodes from the files, and transformers running
the files through bitsandbytes (whose CPU matmul rounds its operands; at 8 bits it also rounds the
activations to int8)."""
import os
import shutil

import numpy as np
import pytest
import torch

from ranks import needs_ranks
from oracle import hf_prompt_logprobs
from quant_checkpoints import changed_quant_config, save_dense
from trained_model import prompt_logprobs
from sageinfer import LLM
from sageinfer.layers.quantization.bnb4 import BLOCK, checkpoint_stream
from sageinfer.ops.lut4_weights import lut4_expand, lut4_expand_kernel

bnb = pytest.importorskip("bitsandbytes")

_GPU = torch.cuda.is_available()
SCHEMES = {"nf4-double": ("nf4", True), "fp4": ("fp4", False), "int8": ("int8", False)}


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    root = tmp_path_factory.mktemp("bitsandbytes")
    out = {}
    for name, (kind, double) in SCHEMES.items():
        config = BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(trained[0], quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32)
        out[name] = str(root / name)
        model.save_pretrained(out[name])
        AutoTokenizer.from_pretrained(trained[0]).save_pretrained(out[name])
    return out


def _quant_state(tensors: dict, layer: str):
    from bitsandbytes.functional import QuantState
    pieces = {k[len(layer) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(layer + ".weight.")}
    return QuantState.from_dict(pieces, device=torch.device("cpu"))


def _decoded_copy(quantized: str, dst: str) -> str:
    """The files' weights decoded by bitsandbytes' dequantize_4bit (int8_vectorwise_dequant at 8 bits) into a
    float32 checkpoint without its quantization config."""
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
    from safetensors.torch import load_file
    shutil.copytree(quantized, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    dense = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and t.dtype == torch.uint8:
            dense[name] = dequantize_4bit(t, _quant_state(tensors, name[:-len(".weight")])).float()
        elif name.endswith(".weight") and t.dtype == torch.int8:
            dense[name] = int8_vectorwise_dequant(t, tensors[name[:-len("weight")] + "SCB"]).float()
        elif ".weight." not in name and not name.endswith((".SCB", ".weight_format")):
            dense[name] = t
    return save_dense(dense, dst)


@pytest.mark.parametrize("name", SCHEMES)
def test_bitsandbytes_checkpoint_matches_its_oracles(trained, saved, name, tmp_path):
    """Measured on the CPU: 2e-6 from the decoded weights, 1.0e-2 (NF4), 1.4e-2 (FP4) and 2.6e-2 (8-bit) from
    bitsandbytes' own forward (its CPU matmul is not float32's: on one layer it is 9e-3 from x @ the weights
    it decodes; at 8 bits it rounds the activations to int8 too)."""
    ids = trained[1][:40]
    ours = prompt_logprobs(saved[name], ids)
    np.testing.assert_allclose(ours, hf_prompt_logprobs(_decoded_copy(saved[name], str(tmp_path / "decoded")), ids),
                               atol=5e-2 if _GPU else 1e-4)
    np.testing.assert_allclose(ours, hf_prompt_logprobs(saved[name], ids), atol=3e-2)


def test_bitsandbytes_layers_stay_at_four_bits(saved):
    llm = LLM(saved["nf4-double"], dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    model = llm.engine.runner.model
    qkv, down = model.model.layers[0].self_attn.qkv_proj, model.model.layers[1].mlp.down_proj
    assert qkv.weight.dtype == torch.uint8 and qkv.weight.shape == (256, 64)  # q 128 + k 64 + v 64 rows
    assert down.weight.shape == (128, 128) and down.weight_absmax.shape == (128, 256 // BLOCK)
    assert model.lm_head.weight.dtype == torch.float32  # transformers keeps the head whole
    llm.engine.shutdown()


def test_bitsandbytes_8_bit_layers_hold_the_files_int8_rows(saved):
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(saved["int8"], "model.safetensors"))
    llm = LLM(saved["int8"], dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    down = llm.engine.runner.model.model.layers[1].mlp.down_proj
    assert down.weight.dtype == torch.int8
    assert torch.equal(down.weight, tensors["model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(down.weight_scale.squeeze(1), tensors["model.layers.1.mlp.down_proj.SCB"] / 127)
    llm.engine.shutdown()


def test_bitsandbytes_at_load_time_holds_what_bitsandbytes_quantizes(trained):
    """quantization="bitsandbytes" on a full-precision checkpoint (vLLM's in-flight 4-bit): each layer's codes
    and block scales are what bitsandbytes' own quantize_4bit gives (NF4, blocks of 64, no double
    quantization); the LM head stays whole."""
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(trained[0], "model.safetensors"))
    llm = LLM(trained[0], dtype="float32", num_gpu_blocks_override=128, show_progress=False,
              quantization="bitsandbytes")
    model = llm.engine.runner.model
    for name in ("mlp.down_proj", "self_attn.o_proj"):
        layer = model.model.layers[1].get_submodule(name)
        codes, state = quantize_4bit(tensors[f"model.layers.1.{name}.weight"].float(), blocksize=BLOCK,
                                     compress_statistics=False, quant_type="nf4")
        assert torch.equal(layer.weight, codes.reshape(layer.weight.shape))
        torch.testing.assert_close(layer.weight_absmax, state.absmax.reshape(layer.weight_absmax.shape))
    assert model.lm_head.weight.dtype == torch.float32
    llm.engine.shutdown()


def test_a_larger_block_is_read_as_bitsandbytes_decodes_it():
    """bitsandbytes' quantize_4bit with blocks of 256 (double quantization on): the stream's held tensors
    expand to what its dequantize_4bit gives."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    weight = torch.randn(48, 512, generator=torch.Generator().manual_seed(0))
    codes, state = quantize_4bit(weight, blocksize=256, compress_statistics=True, quant_type="nf4")
    tensors = {"m.proj.weight": codes, **{f"m.proj.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    held = dict(checkpoint_stream(tensors.items()))
    assert held["m.proj.weight_absmax"].shape == (48, 512 // BLOCK)
    expanded = lut4_expand(held["m.proj.weight"], held["m.proj.weight_absmax"], held["m.proj.weight_table"], BLOCK,
                           torch.float32)
    torch.testing.assert_close(expanded, dequantize_4bit(codes, state).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pieces missing"):
        list(checkpoint_stream([("m.proj.weight", codes)]))


@pytest.mark.parametrize("n,k", [(16, 128), (37, 192), (5, 64)])
def test_the_expansion_kernel_equals_its_reference(n, k):
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    absmax, table = torch.rand(n, k // BLOCK, generator=gen), torch.randn(16, generator=gen)
    for dtype in (torch.float32, torch.float16):
        torch.testing.assert_close(lut4_expand_kernel(codes, absmax, table, BLOCK, dtype),
                                   lut4_expand(codes, absmax, table, BLOCK, dtype), rtol=0, atol=0)


def test_perplexity_of_each_bitsandbytes_scheme(trained, saved):
    """The corpus's perplexity through each checkpoint over the trained model's. Measured on the CPU:
    NF4 with double quantization +7.4%, FP4 +14.3% (blocks of 64, round-to-nearest), 8-bit rows +0.05%, NF4
    quantized at load time +7.4%."""
    path, ids = trained

    def perplexity(p):
        return float(np.exp(-prompt_logprobs(p, ids).mean()))

    base = perplexity(path)
    ratios = {name: perplexity(saved[name]) / base for name in SCHEMES}
    ratios["nf4 at load"] = float(np.exp(-prompt_logprobs(path, ids, quantization="bitsandbytes").mean())) / base
    assert ratios["nf4-double"] < 1.1 and ratios["fp4"] < 1.18 and ratios["nf4-double"] < ratios["fp4"], ratios
    assert ratios["int8"] < 1.005 and ratios["nf4 at load"] < 1.1, ratios


@pytest.mark.parametrize("change,what", [({"load_in_4bit": False, "load_in_8bit": False}, "load_in_4bit False"),
                                         ({"load_in_4bit": False, "load_in_8bit": True,
                                           "llm_int8_has_fp16_weight": True}, "16-bit weights kept: True"),
                                         ({"bnb_4bit_quant_storage": "bfloat16"}, "storage 'bfloat16'")])
def test_bitsandbytes_schemes_not_served_are_refused_at_start(saved, tmp_path, change, what):
    dst = changed_quant_config(saved["nf4-double"], str(tmp_path / "other"), change)
    with pytest.raises(ValueError, match=f"bitsandbytes with .*{what}.*supported: "):
        LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_bitsandbytes_8_bit_tile_layouts_are_refused_at_start(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    dst = str(tmp_path / "col-turing")
    shutil.copytree(saved["int8"], dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight_format"] = torch.tensor(1, dtype=torch.uint8)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layout 1 .*supported: the row layout"):
        LLM(dst, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


def test_dummy_weights_with_a_bitsandbytes_config(saved):
    from quant_checkpoints import dummy_weights_dtype
    assert dummy_weights_dtype(saved["nf4-double"]) == torch.uint8
    assert dummy_weights_dtype(saved["int8"]) == torch.int8


@needs_ranks(2)
@pytest.mark.parametrize("name", ["nf4-double", "int8"])
def test_bitsandbytes_at_two_ranks_gives_one_ranks_logprobs(trained, saved, name):
    ids = trained[1][:40]
    one, two = (prompt_logprobs(saved[name], ids, tensor_parallel_size=tp) for tp in (1, 2))
    np.testing.assert_allclose(one, two, atol=1e-4)
