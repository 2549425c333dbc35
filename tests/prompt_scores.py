"""One prompt through the engine, as tests compare two settings of a model: its scores and greedy tokens."""
from __future__ import annotations


def prompt_scores(path: str, prompt: list[int], dtype: str, max_tokens: int = 3, **engine_kwargs):
    """(the logprob of each prompt token after the first, the greedy tokens, the shut-down LLM) for one prompt,
    eager, on the Triton backend."""
    from sageinfer import LLM, SamplingParams
    llm = LLM(path, dtype=dtype, num_gpu_blocks_override=128, attention_backend="triton", enforce_eager=True,
              show_progress=False, **engine_kwargs)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    llm.engine.shutdown()
    return [out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))], out.outputs[0].token_ids, llm
