"""benchmarks/gpu_gaps.py: the device's idle gaps in a trace, and the engine's host phases marked in it."""
import os
import sys

import torch

from sageinfer import LLM, SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from gpu_gaps import PHASE, idle_gaps, mark_phases  # noqa: E402


def test_idle_gaps_merge_overlapping_kernels_and_keep_gaps_of_the_least_length():
    kernels = [(10.0, 20.0), (0.0, 5.0), (15.0, 30.0), (30.5, 31.0), (40.0, 42.0)]
    busy, span, gaps = idle_gaps(kernels, min_gap=1.0)
    assert (busy, span) == (5.0 + 20.0 + 0.5 + 2.0, 42.0)
    assert gaps == [(5.0, 10.0), (31.0, 40.0)]  # the 0.5 between 30 and 30.5 is shorter than min_gap
    assert idle_gaps([], 1.0) == (0.0, 0.0, [])


def test_marked_phases_show_in_a_host_profile_and_leave_the_outputs_alone(llama_dir):
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 40, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    plain = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    mark_phases(llm.engine)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    names = {e.name for e in prof.events() if e.name.startswith(PHASE)}
    assert names == {PHASE + p for p in ("schedule", "execute", "host inputs", "LM head", "sampler",
                                         "read and apply tokens")}
