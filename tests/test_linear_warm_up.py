"""The start-up's warm-up of the quantized layers' own kernels (executor/linear_warm_up.py): what it
launches, that a model's small-batch steps compile nothing it did not, and its background thread."""
import json
import threading

import numpy as np
import pytest
import torch

from sageinfer import LLM, SamplingParams
from sageinfer.executor.linear_warm_up import linear_warm_up_calls, one_row_warm_up_calls, start_linear_warm_up
from sageinfer.models.tiny import build_tiny_model
from sageinfer.ops import gemv, gemv_int4, gemv_words, int8_matmul, weight_only
from kernels_util import launch_key

SCHEMES = {  # compressed-tensors weight schemes whose dummy weights are quantized at load
    "w4a16": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                 "group_size": 32}),
    "w8a16": ("pack-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group",
                                 "group_size": 32}),
    # INT8 W8A8: its kernel warmed up only where the platform prefers it to the library GEMM (Hopper)
    "int8-w8a8": ("int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                  {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}),
}
KERNELS = {"w4a16": (gemv_int4, "_int4_gemv_mma_kernel"), "w8a16": (weight_only, "_weight_only_kernel"),
           "int8-w8a8": (int8_matmul, "_int8_matmul_kernel")}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # hidden 128: 4-bit words in slices of 16 columns, the narrowest the tensor-core matmul takes
    return build_tiny_model(str(tmp_path_factory.mktemp("warm") / "qwen3"), "qwen3", seed=4, hidden_size=128,
                            num_layers=1)


def _quantized(tiny_dir: str, tmp_path, scheme: str) -> str:
    import shutil
    path = str(tmp_path / scheme)
    shutil.copytree(tiny_dir, path)
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    fmt, weights, *activations = SCHEMES[scheme]
    group = {"targets": ["Linear"], "weights": weights}
    if activations:
        group["input_activations"] = activations[0]
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
                                     "config_groups": {"group_0": group}}
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    return path


def _record(monkeypatch, module, name: str, seen: set) -> None:
    kernel = getattr(module, name)

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.add(launch_key(kernel, args, kwargs))
                return kernel[grid](*args, **kwargs)
            return run
    monkeypatch.setattr(module, name, Recorder())


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "int8-w8a8"])
def test_small_batch_steps_compile_nothing_the_warm_up_did_not(tiny_dir, tmp_path, monkeypatch, scheme):
    """Prefill chunks, mixed steps and decodes of 2 to 20 rows through the layers' own kernels (their
    row limit lowered to 20, to keep the interpreter's launches few): every launch's compile key
    (constexprs, launch options, specialisation of the other arguments) was launched by the warm-up."""
    from sageinfer.layers.quantization import w4a16, w8a16
    from sageinfer.platforms import get_platform
    monkeypatch.setattr(w4a16, "MMA_MAX_ROWS", 20)  # (both tile heights of the tensor-core matmul: 16, 32)
    monkeypatch.setattr(w8a16, "W8A16_MAX_ROWS", 20)
    monkeypatch.setattr(type(get_platform()), "prefers_int8_kernel", lambda self: True)
    llm = LLM(_quantized(tiny_dir, tmp_path, scheme), dtype="float32", load_format="dummy",
              attention_backend="triton", num_gpu_blocks_override=64, max_model_len=256, max_num_seqs=6,
              max_num_batched_tokens=20, enforce_eager=True, show_progress=False)
    runner = llm.engine.runner
    module, name = KERNELS[scheme]
    warmed, stepped = set(), set()
    with monkeypatch.context() as patch:
        _record(patch, module, name, warmed)
        calls = linear_warm_up_calls(runner.model, runner.dtype, runner.device)
        # qkv, o, gate_up and down: each its own shapes
        assert len(calls) == 4
        for call in calls:
            call()
    if scheme == "int8-w8a8":  # both decode tile kinds (up to 64 rows, up to 512), not only what these steps take,
        # and with the descriptor kernel on, the pointer kernel's wide tiles (513 to 8,192 rows) too
        assert len(warmed) == (3 if int8_matmul.INT8_TMA else 2)
    _record(monkeypatch, module, name, stepped)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (17, 3, 9, 14, 5, 30)]
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=3),
                 use_tqdm=False)
    assert stepped, "no step ran the layers' own kernels"
    missing = stepped - warmed
    assert not missing, f"{len(missing)} launches of the steps were not warmed up: {sorted(missing)[:1]}"


@pytest.mark.parametrize("scheme", [None, "w4a16"])
def test_a_single_streams_decode_compiles_no_one_row_kernel_the_warm_up_did_not(tiny_dir, tmp_path, monkeypatch,
                                                                                 scheme):
    """One sequence's decode steps (the one-row path: norms, activation and residual adds folded into the
    matmuls, then the LM head) launch only one-row kernels that the one-row warm-up launched."""
    path = _quantized(tiny_dir, tmp_path, scheme) if scheme else tiny_dir
    llm = LLM(path, dtype="float32", load_format="dummy", attention_backend="triton", num_gpu_blocks_override=64,
              max_model_len=256, enforce_eager=True, show_progress=False)
    runner = llm.engine.runner
    kernels = [(gemv, "_gemv_kernel"), (gemv_words, "_gemv_words_kernel"), (gemv_int4, "_int4_gemv_kernel")]
    warmed, stepped = set(), set()
    with monkeypatch.context() as patch:
        for module, name in kernels:
            _record(patch, module, name, warmed)
        calls = one_row_warm_up_calls(runner.model, runner.dtype, runner.device)
        assert len(calls) == 1
        calls[0]()
    for module, name in kernels:
        _record(monkeypatch, module, name, stepped)
    llm.generate({"prompt_token_ids": [5, 9, 14]}, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                 use_tqdm=False)
    assert len(stepped) >= 4, "the decode steps did not take the one-row path"  # qkv, o, gate_up, down, head
    missing = stepped - warmed
    assert not missing, f"{len(missing)} one-row launches were not warmed up: {sorted(missing)[:1]}"


def test_the_calls_cover_each_distinct_layer_once_within_its_methods_rows(tiny_dir, tmp_path, monkeypatch):
    """One call per distinct quantized layer, at every row count from 2 to its method's kernel_rows; nothing
    where the platform runs no kernels."""
    from sageinfer.executor import linear_warm_up
    llm = LLM(_quantized(tiny_dir, tmp_path, "w4a16"), dtype="float32", load_format="dummy",
              num_gpu_blocks_override=64, max_model_len=256, enforce_eager=True, show_progress=False)
    model = llm.engine.runner.model
    ran = []
    monkeypatch.setattr(linear_warm_up, "_matmuls", lambda layer, rows, *a: ran.append((layer, rows)))
    for layer in model.modules():
        if hasattr(layer, "use_triton"):
            layer.use_triton = False
    assert linear_warm_up_calls(model, torch.float32, "cpu") == []
    for layer in model.modules():
        if hasattr(layer, "use_triton"):
            layer.use_triton = True
    for call in linear_warm_up_calls(model, torch.float32, "cpu"):
        call()
    layers = [layer for layer, _ in ran]
    first = model.model.layers[0]
    assert layers == [first.self_attn.qkv_proj, first.self_attn.o_proj, first.mlp.gate_up_proj, first.mlp.down_proj]
    assert all(rows == list(range(2, 33)) for _, rows in ran)  # (W4A16's kernel_rows: 32)


def test_the_background_runs_each_call_in_the_pool_then_again_in_the_callers_thread():
    threads = []
    finish = start_linear_warm_up([lambda: threads.append(threading.current_thread().name)] * 3, threads=2)
    finish()
    assert len(threads) == 6 and threads[-3:] == [threading.current_thread().name] * 3
    assert all(name != threading.current_thread().name for name in threads[:3])


def test_the_background_raises_a_calls_error_at_finish_and_a_cancel_skips_the_rest():
    def fail():
        raise RuntimeError("no compile today")
    with pytest.raises(RuntimeError, match="no compile today"):
        start_linear_warm_up([fail], threads=2)()
    gate, ran = threading.Event(), []
    finish = start_linear_warm_up([gate.wait] + [lambda: ran.append(1)] * 4, threads=1)
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    finish(cancel=True)  # the first call is under way; the others are skipped
    assert ran == []
