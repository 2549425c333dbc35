"""benchmarks/schedule_replay.py: a mix through the real scheduler without a model, its steps counted."""
import os
import sys

from sageinfer.bench.mixed import mixed_prompts

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from schedule_replay import replay  # noqa: E402


def test_the_replay_serves_every_request_and_counts_the_recomputation_of_preemptions():
    prompts, outputs = mixed_prompts("chat-mix", 60, 4096, seed=0)
    tight = sum(map(len, prompts)) // 4  # a quarter of the prompts fit at once
    greedy = replay(prompts, outputs, tight, 16, lookahead=0, max_model_len=40960)
    reserved = replay(prompts, outputs, tight, 16, lookahead=256, max_model_len=40960)
    roomy = replay(prompts, outputs, 10 * sum(map(len, prompts)), 16, lookahead=256, max_model_len=40960)
    # every request ran to its length: at least its output's steps, no more tokens than asked unless recomputed
    assert min(r["steps"] for r in (greedy, reserved, roomy)) >= max(outputs)
    assert greedy["preemptions"] > 0 and greedy["recomputed_tokens"] > 0
    assert reserved["preemptions"] == 0 and reserved["recomputed_tokens"] == 0
    # a cache that holds the whole mix admits everything in the first steps and needs fewer of them
    assert roomy["steps"] < reserved["steps"] and roomy["mean_kv_used"] < 1.0
    assert 1 <= roomy["last_admission"] <= -(-sum(map(len, prompts)) // 16384) + 1  # the step's budget: 16,384
    assert reserved["last_admission"] > roomy["last_admission"]  # a tight cache admits the last requests later
    assert 0 < reserved["decode_only_steps"] < reserved["steps"]


def test_blocks_that_ending_requests_give_back_admit_the_next_ones_sooner_without_preempting(monkeypatch):
    """The reserve of engine/admission_reserve.py against holding back every request's whole growth (the same
    function told that no request is decoding, so none counts as ending): on a tight cache, fewer steps and
    still no preemption."""
    import numpy as np

    from sageinfer.engine import scheduler
    prompts, outputs = mixed_prompts("chat-mix", 80, 4096, seed=1)
    tight = sum(map(len, prompts)) // 4
    counted = replay(prompts, outputs, tight, 16, lookahead=256, max_model_len=40960)
    whole = scheduler.reserve_blocks
    monkeypatch.setattr(scheduler, "reserve_blocks", lambda n, end, held, decoding, lookahead, bs, **_: whole(
        n, end, held, np.zeros_like(decoding), lookahead, bs))
    held_back = replay(prompts, outputs, tight, 16, lookahead=256, max_model_len=40960)
    assert counted["preemptions"] == held_back["preemptions"] == 0
    assert counted["steps"] < held_back["steps"] and counted["last_admission"] < held_back["last_admission"]


def test_requests_that_share_a_prefix_free_only_their_own_blocks_when_they_end():
    """Sixty requests on one 1,024-token prefix in a cache that holds it and little more: an ending request gives
    back only the blocks no other request holds, so admission never counts the shared prefix as coming back
    (counted whole, the same run preempts 5-8 times at these sizes)."""
    import numpy as np
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 4000, 1024).tolist()
    prompts = [prefix + rng.integers(3, 4000, 16).tolist() for _ in range(60)]
    outputs = rng.integers(5, 120, 60).tolist()
    for kv_tokens in (1500, 2600):
        result = replay(prompts, outputs, kv_tokens, 16, lookahead=256, max_model_len=40960)
        assert result["preemptions"] == 0 and result["recomputed_tokens"] == 0
        assert result["last_admission"] > 1  # the cache admitted them over many steps


def test_each_steps_load_adds_up_to_the_work_of_the_requests():
    """Without preemption or shared prefixes, the steps' loads sum to what the requests ask: every prompt
    token and every output token but the last computed once, each output token sampled once, a prompt's causal
    (query, key) pairs, and each decode reading its whole context."""
    import numpy as np
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 4000, int(n)).tolist() for n in rng.integers(5, 3000, 40)]  # some over a step
    outputs = rng.integers(1, 90, 40).tolist()
    result = replay(prompts, outputs, 10 * sum(map(len, prompts)), 16, lookahead=256, max_model_len=40960)
    tokens, sampled, pairs, keys = (sum(load[i] for load in result["step_loads"]) for i in range(4))
    assert len(result["step_loads"]) == result["steps"] and result["preemptions"] == 0
    assert tokens == sum(map(len, prompts)) + sum(outputs) - len(outputs)
    assert sampled == sum(outputs)
    assert pairs == sum(len(p) * (len(p) + 1) / 2 for p in prompts)
    assert keys == sum((o - 1) * len(p) + (o - 1) * o // 2 for p, o in zip(prompts, outputs))


def test_decodes_that_share_a_prefix_read_it_once_a_step():
    """Ten prompts on one 64-token prefix (four blocks of 16): the first step computes the prefix once, and each
    decode step reads it once (as cascade attention does) plus each sequence's own keys."""
    import numpy as np
    rng = np.random.default_rng(4)
    prefix = rng.integers(3, 4000, 64).tolist()
    prompts = [prefix + rng.integers(3, 4000, 8).tolist() for _ in range(10)]
    result = replay(prompts, [5] * 10, 100_000, 16, lookahead=256, max_model_len=40960)
    first, *decodes = result["step_loads"]
    assert first == (64 + 10 * 8, 10, 64 * 65 / 2 + 10 * (8 * 64 + 8 * 9 / 2), 0)
    # the step's contexts are 73, 74, 75, 76 keys: the prefix's 64 once, each sequence's other keys
    assert [load[3] for load in decodes] == [64 + 10 * (context - 64) for context in (73, 74, 75, 76)]


def test_the_command_prints_the_schedules_floor_split_into_prefilling_and_decode_only_steps(tmp_path):
    import json
    import re
    import subprocess
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"bf16_matmul_tflops": 800.0, "copy_bandwidth_gbs": 3000.0}))
    out = subprocess.run([sys.executable, "benchmarks/schedule_replay.py", "--mix", "chat-mix:30", "--kv-tokens",
                          "200000", "--lookaheads", "256", "--ceilings", str(ceilings)],
                         capture_output=True, text=True, check=True).stdout
    total, prefill, decode = map(float, re.search(r"\| ([\d.]+) s \(([\d.]+) \+ ([\d.]+)\) \|", out).groups())
    assert total > 0 and prefill > 0 and decode > 0 and abs(prefill + decode - total) <= 0.011
