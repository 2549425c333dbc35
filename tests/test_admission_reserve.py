"""engine/admission_reserve.py: the blocks admission holds back for the running requests' growth."""
import numpy as np

from sageinfer.engine.admission_reserve import reserve_blocks


def _whole_growth(num_tokens, end_tokens, held, lookahead, bs):
    """Every request's growth over the lookahead held back at once (what the scheduler held back before)."""
    target = np.minimum(end_tokens, num_tokens + lookahead)
    return int(np.maximum(0, -(-target // bs) - held).sum())


def test_without_requests_that_end_within_the_lookahead_it_holds_back_every_requests_growth():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = rng.integers(1, 5000, 40)
        held = -(-n // 16)
        end = n + rng.integers(300, 2000, 40)  # none ends within 256 tokens
        decoding = rng.random(40) < 0.7
        assert reserve_blocks(n, end, held, decoding, 256, 16) == _whole_growth(n, end, held, 256, 16)


def test_it_never_holds_back_more_than_every_requests_growth():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = rng.integers(1, 3000, 30)
        held = -(-n // 64) + rng.integers(0, 2, 30)
        end = n + rng.integers(0, 600, 30)
        decoding = rng.random(30) < 0.8
        got = reserve_blocks(n, end, held, decoding, 256, 64)
        assert 0 <= got <= _whole_growth(n, end, held, 256, 64)


def test_a_request_that_ends_soon_gives_its_blocks_back_before_another_grows_into_them():
    """A holds 10 blocks of 64 and ends 10 tokens later (11 blocks until it frees them at step 12); B holds one
    block and may grow 256 tokens (5 blocks). Held back: the most at once, A's extra block and B's second, 2,
    not 1 + 4. A prefill's chunks may take several steps, so a request not yet decoding keeps its whole growth."""
    n, end, held = np.array([640, 64]), np.array([650, 10_000]), np.array([10, 1])
    assert _whole_growth(n, end, held, 256, 64) == 5
    assert reserve_blocks(n, end, held, np.array([True, True]), 256, 64) == 2
    assert reserve_blocks(n, end, held, np.array([False, True]), 256, 64) == 5
    # ending right at the lookahead's edge still counts; past it, not
    assert reserve_blocks(np.array([640, 64]), np.array([640 + 256, 10_000]), held, np.array([True, True]), 256,
                          64) == _whole_growth(np.array([640, 64]), np.array([896, 10_000]), held, 256, 64)
    # A's 10 blocks shared with other requests (a common prefix): its end frees only its extra block, so B's growth
    # past it is held back too (4 blocks, the most at once, after A's end)
    assert reserve_blocks(n, end, held, np.array([True, True]), 256, 64, freed_blocks=np.array([0, 1])) == 4
    assert reserve_blocks(n, end, held, np.array([True, True]), 256, 64, freed_blocks=np.array([4, 1])) == 2
    assert reserve_blocks(n, end, held, np.array([True, True]), 0, 64) == 0
    assert reserve_blocks(n[:0], end[:0], held[:0], np.array([], bool), 256, 64) == 0


def test_the_engine_with_asynchronous_steps_admits_sooner_and_never_preempts(model_dirs, monkeypatch):
    """Through the engine (asynchronous scheduling: a step's tokens read a step late), lengths of a mix on a cache
    of a sixth of the prompts: every request runs to its length, without a preemption, in fewer steps than when
    every running request's whole growth is held back."""
    from sageinfer import LLM, SamplingParams
    from sageinfer.engine import scheduler
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(4.0, 0.6, 50).astype(int), 4, 200)
    outs = np.clip(rng.lognormal(3.2, 0.7, 50).astype(int), 1, 80)
    prompts = [{"prompt_token_ids": rng.integers(3, 500, n).tolist()} for n in lens]
    params = [SamplingParams(temperature=0.0, max_tokens=int(k), ignore_eos=True) for k in outs]
    steps = {}
    whole = scheduler.reserve_blocks
    for kind in ("counted", "held back"):
        if kind == "held back":
            monkeypatch.setattr(scheduler, "reserve_blocks", lambda n, end, held, decoding, lookahead, bs, **_: whole(
                n, end, held, np.zeros_like(decoding), lookahead, bs))
        llm = LLM(model_dirs["qwen3"], dtype="float32", num_gpu_blocks_override=int(sum(lens)) // 16 // 6 + 20,
                  block_size=16, max_model_len=512, max_num_seqs=64, max_num_batched_tokens=256, show_progress=False)
        assert llm.engine.config.async_scheduling
        calls = [0]
        schedule = llm.engine.scheduler.schedule
        monkeypatch.setattr(llm.engine.scheduler, "schedule", lambda: calls.__setitem__(0, calls[0] + 1) or schedule())
        results = llm.generate(prompts, params, use_tqdm=False)
        assert [len(r.outputs[0].token_ids) for r in results] == outs.tolist()
        assert llm.engine.scheduler.num_preemptions == 0
        steps[kind] = calls[0]
    assert steps["counted"] < steps["held back"]
