"""Bad words that bite: words the greedy continuation of a prompt writes, so that banning them changes it."""
from sageinfer import LLM, SamplingParams


def two_token_words(model_dir, prompt, max_tokens: int) -> list[str]:
    """Words of two tokens that the tokenizer reads back as those two tokens, in the greedy continuation of the
    prompt (a string or {"prompt_token_ids": ...}), in order and without repeats."""
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=128, max_model_len=200, show_progress=False)
    tokens = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    tok = llm.get_tokenizer()
    words = [tok.decode(tokens[i:i + 2]) for i in range(len(tokens) - 1)
             if tok.encode(tok.decode(tokens[i:i + 2]), add_special_tokens=False) == tokens[i:i + 2]]
    return [w for w in dict.fromkeys(words) if w.strip()]
