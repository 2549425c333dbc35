"""long_prefill_token_threshold: while requests wait, a prefill takes at most that many tokens a step, so
short prompts behind a long one are not held until it has been computed; a lone prompt keeps the whole
budget, and the tokens stay those of the unlimited engine."""
import pytest

from sageinfer import LLM, SamplingParams
from sageinfer.config import EngineConfig
from sageinfer.engine.request import Request
from sageinfer.engine.scheduler import Scheduler
from sageinfer.kv_cache.manager import KVCacheManager


def _first_token_steps(threshold, prompt_lens, budget=512):
    """Drive the scheduler alone (every scheduled token computed, a token sampled once a prompt is done);
    returns each request's step of first token and the tokens each step computed."""
    config = EngineConfig(model="unused", max_num_seqs=64, max_num_batched_tokens=budget,
                          long_prefill_token_threshold=threshold)
    config.max_model_len = 4096
    kv = KVCacheManager(2048, 4, enable_caching=False)
    sched = Scheduler(config, kv)
    for i, n in enumerate(prompt_lens):
        r = Request(f"r{i}", f"r{i}", 0, [5 + (i + j) % 300 for j in range(n)],
                    SamplingParams(max_tokens=2, ignore_eos=True), set())
        r.max_output_tokens = 2
        sched.add_request(r)
    first, per_step, step = {}, [], 0
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update_after_step(out)
        per_step.append([(r.request_id, n) for r, n in out.scheduled])
        for r, _ in out.scheduled:
            if r.num_computed_tokens == r.num_tokens:
                r.resolve_placeholder(r.append_placeholder(0), 7)
                first.setdefault(r.request_id, step)
                if r.num_output_tokens >= 2:
                    sched.finish(r, "length")
        step += 1
    return first, per_step


def test_short_prompts_behind_a_long_one_start_at_once():
    lens = [2000, 40, 40, 40]
    unlimited, _ = _first_token_steps(0, lens)
    limited, steps = _first_token_steps(256, lens)
    # Unlimited, the long prompt takes the whole budget of its first three steps and the short ones wait.
    assert unlimited["r0"] == 3 and min(unlimited[f"r{i}"] for i in (1, 2, 3)) == 3
    # Limited, the first step holds 256 of the long prompt and the three short prompts.
    assert steps[0] == [("r0", 256), ("r1", 40), ("r2", 40), ("r3", 40)]
    assert all(limited[f"r{i}"] == 0 for i in (1, 2, 3))
    # Once nobody waits, the long prompt takes the budget again: 256 + 512 * 3 + 208 = 2000.
    assert [n for step in steps for rid, n in step if rid == "r0"][:5] == [256, 512, 512, 512, 208]


def test_a_lone_long_prompt_keeps_the_whole_budget():
    _, steps = _first_token_steps(256, [2000])
    assert [n for step in steps for _, n in step][:4] == [512, 512, 512, 464]


def test_threshold_below_zero_is_refused():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(model="unused", long_prefill_token_threshold=-1)


def test_tokens_match_the_unlimited_engine(llama_dir):
    prompts = [{"prompt_token_ids": [3 + (7 * i + j) % 400 for j in range(n)]} for i, n in enumerate((300, 20, 35, 9))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for threshold in (0, 32):
        llm = LLM(model=llama_dir, max_num_batched_tokens=96, long_prefill_token_threshold=threshold,
                  num_gpu_blocks_override=256, show_progress=False)
        outs.append([list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outs[0] == outs[1]
