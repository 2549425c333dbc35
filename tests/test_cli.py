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
