"""Mixed-length workloads: seeded, shaped as described, within the model's length, and runnable
offline and against a server."""
import numpy as np
import pytest

from sageinfer.bench.mixed import MIXES, mixed_lengths, mixed_prompts


def test_mixes_are_seeded_and_shaped_as_described():
    for name in MIXES:
        assert mixed_lengths(name, 500, seed=3) == mixed_lengths(name, 500, seed=3)
        assert mixed_lengths(name, 500, seed=3) != mixed_lengths(name, 500, seed=4)
    prompts, outputs = map(np.array, mixed_lengths("chat-mix", 4000, seed=0))
    assert 600 < np.median(prompts) < 800 and 170 < np.median(outputs) < 230
    assert prompts.min() >= 16 and prompts.max() <= 8192 and outputs.max() <= 1024
    assert (prompts > 4 * np.median(prompts)).mean() > 0.05  # a long tail, not a narrow band
    prompts, outputs = map(np.array, mixed_lengths("long-mix", 4000, seed=0))
    long = prompts >= 8192
    assert 0.08 < long.mean() < 0.12 and set(prompts[~long]) == {1024} and set(outputs) == {128}
    assert prompts.max() <= 32768


def test_a_mix_fits_the_model_length():
    prompts, outputs = mixed_lengths("long-mix", 300, seed=1, max_model_len=4096)
    assert max(p + o for p, o in zip(prompts, outputs)) <= 4096 and min(outputs) >= 1
    token_prompts, outs = mixed_prompts("chat-mix", 20, vocab_size=500, seed=2, max_model_len=256)
    assert [len(p) + o for p, o in zip(token_prompts, outs)] == [p + o for p, o in zip(
        *mixed_lengths("chat-mix", 20, seed=2, max_model_len=256))]
    assert all(125 <= t < 375 for p in token_prompts for t in p)  # the middle half of a tiny vocabulary


def test_offline_throughput_runs_a_mix(llama_dir):
    from sageinfer import LLM
    from sageinfer.bench.runs import run_throughput
    llm = LLM(llama_dir, max_model_len=256, num_gpu_blocks_override=200, show_progress=False)
    result = run_throughput(llm, {"kind": "throughput", "mix": "chat-mix", "num_prompts": 12, "seed": 0},
                            use_tqdm=False)
    _, outputs = mixed_lengths("chat-mix", 12, seed=0, max_model_len=256)
    assert result["generated_tokens"] == sum(outputs)


def test_unknown_mix_is_refused():
    with pytest.raises(ValueError, match="unknown mix"):
        mixed_lengths("poisson", 3, 0)


def test_serve_summary_splits_ttft_by_prompt_length():
    from sageinfer.bench.serve import RequestResult, summarize
    results = [RequestResult(ok=True, prompt_len=n, ttft=t, e2e=t + 1.0, output_tokens=2)
               for n, t in ((100, 0.1), (1024, 0.3), (3000, 0.5), (20000, 2.0), (20000, 4.0))]
    results.append(RequestResult(ok=False, prompt_len=50))
    by_len = summarize(results, 10.0, {})["ttft_ms_by_prompt_len"]
    assert {name: s["count"] for name, s in by_len.items()} == {"<=1024": 2, "<=4096": 1, ">16384": 2}
    assert by_len["<=1024"]["median"] == pytest.approx(200.0) and by_len[">16384"]["median"] == pytest.approx(3000.0)
