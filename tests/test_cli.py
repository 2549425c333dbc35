import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sageinfer.gateway.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_completion(llama_dir):
    result = _run("generate", "--model", llama_dir, "--prompt", "Hello, my name is", "--max-tokens", "5",
                  "--temperature", "0", "--num-gpu-blocks-override", "128", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "Hello, my name is" in result.stdout and "finish: " in result.stdout


def test_bad_flag_value_prints_an_error_line(llama_dir):
    result = _run("generate", "--model", llama_dir, "--prompt", "x", "--top-p", "2",
                  "--num-gpu-blocks-override", "128")
    assert result.returncode == 2 and "error: top_p must be in (0, 1]" in result.stderr


def test_bench_throughput_runs_a_small_workload(llama_dir, tmp_path):
    result_file = tmp_path / "r.json"
    result = _run("bench", "throughput", "--model", llama_dir, "--workload", "T2-decode-heavy", "--num-prompts", "3",
                  "--input-len", "20", "--output-len", "4", "--dtype", "float32", "--num-gpu-blocks-override", "128",
                  "--result-file", str(result_file), "--skip-tokenizer-init")
    assert result.returncode == 0, result.stderr
    import json
    r = json.loads(result_file.read_text())["result"]
    assert r["generated_tokens"] == 12 and r["total_tok_s"] > 0


def test_every_engine_option_has_a_flag_and_reaches_the_config():
    import dataclasses

    from sageinfer.config import EngineConfig
    from sageinfer.gateway.cli import build_parser
    from sageinfer.gateway.engine_args import engine_kwargs
    args = build_parser().parse_args(["generate", "--model", "m", "--max-num-seqs", "7", "--no-enable-prefix-caching",
                                      "--kv-cache-dtype", "fp8", "--enforce-eager", "--kv-cache-memory-bytes", "4096"])
    kwargs = engine_kwargs(args)
    assert set(kwargs) == {f.name for f in dataclasses.fields(EngineConfig)} | {"attention_backend"}
    assert (kwargs["max_num_seqs"], kwargs["enable_prefix_caching"], kwargs["kv_cache_dtype"], kwargs["enforce_eager"],
            kwargs["kv_cache_memory_bytes"]) == (7, False, "fp8", True, 4096)
    defaults = engine_kwargs(build_parser().parse_args(["generate", "--model", "m"]))
    assert all(defaults[f.name] == f.default for f in dataclasses.fields(EngineConfig) if f.name != "model")


def test_llm_names_an_unknown_option(llama_dir):
    import pytest

    from sageinfer import LLM
    with pytest.raises(ValueError, match="max_num_seq'"):
        LLM(llama_dir, max_num_seq=4)


def test_version_and_a_model_path_that_is_not_there():
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("sageinfer ")
    missing = _run("generate", "--model", "Qwen/Qwen3-8B", "--prompt", "x")
    assert missing.returncode == 2 and "model hub ids are not supported here" in missing.stderr


def test_help_imports_no_torch():
    code = ("import sys; from sageinfer.gateway.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_quantization_flag_quantizes_or_refuses_with_what_is_supported(llama_dir):
    result = _run("generate", "--model", llama_dir, "--prompt", "x", "--quantization", "fp8", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    result = _run("generate", "--model", llama_dir, "--prompt", "x", "--quantization", "awq")
    assert result.returncode == 2 and "quantization='awq' on a full-precision checkpoint is not supported; supported:" in result.stderr


def test_serve_with_a_tokenizer_that_does_not_load_exits_with_an_error_line(llama_dir, tmp_path):
    """The front end loads its tokenizer while the engine core starts: a tokenizer that cannot load still
    ends start-up with one error line and a non-zero exit, not a traceback or a hang."""
    result = _run("serve", llama_dir, "--port", "0", "--dtype", "float32", "--num-gpu-blocks-override", "64",
                  "--enforce-eager", "--tokenizer", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "error: the engine core failed to start" in result.stderr and "could not load a tokenizer" in result.stderr


def test_a_background_load_returns_its_value_or_raises_its_error():
    import pytest

    from sageinfer.engine.core_client import _InBackground
    assert _InBackground(lambda: (1, 2)).result() == (1, 2)
    with pytest.raises(IndexError):
        _InBackground(lambda: [][0]).result()


def test_a_taken_port_fails_at_once_with_the_address_named(llama_dir):
    """serve, router and launch bind their port before the slow part of start-up (the engine's load,
    the instances, Ray, whose processes take free ports of their own meanwhile): a taken port is an
    error line before any of it, not a crash after it."""
    import socket
    import time
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args in (["serve", llama_dir, "--dtype", "float32", "--num-gpu-blocks-override", "64"],
                     ["router", "--backend", "http://127.0.0.1:1"],
                     ["launch", llama_dir, "--instances", "1", "--policy", "round_robin"]):
            start = time.monotonic()
            result = _run(*args, "--host", "127.0.0.1", "--port", port)
            assert result.returncode == 2, (args[0], result.stdout, result.stderr)
            assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
            assert "launched" not in result.stdout and "KV cache" not in result.stdout
            assert time.monotonic() - start < 60


def test_a_port_out_of_range_and_a_missing_chat_template_fail_before_start_up(llama_dir):
    """A port outside 0-65535 is argparse's error line (it was bind()'s OverflowError traceback), for every
    command that listens, as are instance ports that would pass 65535; a chat template file that is not there
    fails before the engine loads."""
    for args in (["serve", llama_dir], ["router", "--backend", "http://127.0.0.1:1"], ["proxy"],
                 ["launch", llama_dir, "--instances", "1"]):
        for port in ("99999", "-1", "http"):
            result = _run(*args, "--port", port)
            assert result.returncode == 2 and "Traceback" not in result.stderr, (args[0], port, result.stderr)
            assert "argument --port:" in result.stderr, result.stderr
    for ports in (["--port", "65535"], ["--port", "65000", "--first-instance-port", "65535"], ["--port", "0"]):
        result = _run("launch", llama_dir, "--instances", "2", *ports)  # the instances' ports, checked first
        assert result.returncode == 2 and ("past 65535" in result.stderr or "--first-instance-port" in result.stderr)
        assert "Traceback" not in result.stderr and "launched" not in result.stdout, result.stderr
    result = _run("serve", llama_dir, "--port", "0", "--dtype", "float32", "--num-gpu-blocks-override", "64",
                  "--chat-template", "/nowhere/template.jinja")
    assert result.returncode == 2 and "error: --chat-template: no such file" in result.stderr
    assert "KV cache" not in result.stdout  # refused before the engine was built
