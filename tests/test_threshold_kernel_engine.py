"""The sampler's threshold kernel in an engine on the Triton backend: start-up launches it as serving does (so no
request compiles it), and seeded requests draw over it the tokens the sorted vocabulary gives them."""
from sageinfer import LLM, SamplingParams
from sageinfer.layers import sampler
from sageinfer.ops import sampling_thresholds
from kernels_util import launch_key


KERNEL = sampling_thresholds._threshold_draw_kernel


def _record(monkeypatch, seen: list, kernel=KERNEL) -> None:
    class Recorder:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                seen.append(launch_key(kernel, args, kwargs))
                return launch(*args, **kwargs)
            return run
    monkeypatch.setattr(sampling_thresholds, "_threshold_draw_kernel", Recorder())


def test_start_up_launches_the_threshold_kernel_as_serving_does_and_seeded_draws_match_the_sort(model_dirs,
                                                                                               monkeypatch):
    # The tiny vocabulary (512) would draw among the top-k: a lower bound sends these rows over the vocabulary.
    monkeypatch.setattr(sampler, "TOP_K_DRAW_MAX", 16)
    monkeypatch.setattr(sampler, "THRESHOLD_KERNEL_MIN_ROWS", 3)
    at_start_up, serving = [], []
    _record(monkeypatch, at_start_up)
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=64,
              max_model_len=128, max_num_seqs=4, enforce_eager=True, show_progress=False)
    assert llm.engine.runner.sampler.threshold_kernel and len(at_start_up) == 1  # no memory profile: the warm-up
    _record(monkeypatch, serving)

    prompts = [{"prompt_token_ids": [5 + i, 17, 40 + 3 * i, 9]} for i in range(4)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=5, ignore_eos=True) for i in range(3)]
    params.append(SamplingParams(temperature=0.8, top_k=300, min_p=0.01, seed=7, max_tokens=5, ignore_eos=True))
    by_kernel = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert serving and set(serving) <= set(at_start_up), "a serving launch compiled what start-up did not"

    launches = len(serving)
    llm.engine.runner.sampler.threshold_kernel = False
    by_sort = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert len(serving) == launches and by_kernel == by_sort
    assert len({t for tokens in by_kernel for t in tokens}) > 4  # draws, not one argmax
