"""Start-up runs a long prompt's steps once (the kernels long prompts take compile there, not on the
first user's request), and leaves nothing behind that a request could see."""
from ranks import needs_ranks
from sageinfer import LLM, SamplingParams
from sageinfer.executor.model_runner import ModelRunner
from sageinfer.ops import paged_attention

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (20, 130)]


def _engine(llama_dir, **options):
    return LLM(llama_dir, dtype="float32", attention_backend="triton", max_model_len=256, max_num_batched_tokens=64,
               num_gpu_blocks_override=64, block_size=16, enforce_eager=True, show_progress=False, **options)


def test_the_long_prompt_steps_run_at_start_up_and_change_no_output(llama_dir, monkeypatch):
    plain = _engine(llama_dir)  # max_model_len under LONG_CONTEXT: nothing to warm
    assert plain.engine.long_prompt_warm_up_seconds == 0.0
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY, use_tqdm=False)]

    steps = []
    original = ModelRunner.execute
    monkeypatch.setattr(ModelRunner, "execute", lambda self, scheduled, *a, **kw: (
        steps.append([(r.num_computed_tokens, n) for r, n in scheduled]), original(self, scheduled, *a, **kw))[1])
    monkeypatch.setattr(paged_attention, "LONG_CONTEXT", 100)  # a tiny model's "long" prompt
    warmed = _engine(llama_dir)
    assert warmed.engine.long_prompt_warm_up_seconds > 0
    assert steps[-2:] == [[(0, 64)], [(64, 63)]]  # 128 tokens in two chunks, the second of another length
    pool = warmed.engine.kv_manager.pool
    assert pool.num_free_blocks == pool.usable_blocks and not pool.cached
    assert [o.outputs[0].token_ids for o in warmed.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected


def test_no_warm_up_for_a_backend_without_long_prompt_kernels(llama_dir, monkeypatch):
    monkeypatch.setattr(paged_attention, "LONG_CONTEXT", 100)
    llm = LLM(llama_dir, dtype="float32", attention_backend="torch_ref", max_model_len=256, max_num_batched_tokens=64,
              num_gpu_blocks_override=64, show_progress=False)
    assert llm.engine.long_prompt_warm_up_seconds == 0.0


@needs_ranks(2)
def test_tensor_parallel_ranks_run_the_warm_up_rank_0_chose(llama_dir, monkeypatch):
    """Rank 0 decides the warm-up and sends it to the other ranks, whose steps' collectives must pair
    with its (here only rank 0's process sees the tiny LONG_CONTEXT): the tp=2 engine warms up, then
    answers as tp=1 does."""
    monkeypatch.setattr(paged_attention, "LONG_CONTEXT", 100)
    single = _engine(llama_dir)
    expected = [o.outputs[0].token_ids for o in single.generate(PROMPTS, GREEDY, use_tqdm=False)]
    single.engine.shutdown()
    sharded = _engine(llama_dir, tensor_parallel_size=2)
    assert sharded.engine.long_prompt_warm_up_seconds > 0
    assert [o.outputs[0].token_ids for o in sharded.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    sharded.engine.shutdown()
