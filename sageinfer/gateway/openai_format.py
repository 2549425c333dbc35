"""RequestOutput -> OpenAI JSON pieces (choices, logprobs, usage); no HTTP here."""
from __future__ import annotations

from sageinfer.outputs import CompletionOutput


def completion_logprobs(c: CompletionOutput, start: int, end: int, k: int, text_start: int = 0) -> dict:
    """Legacy completions logprobs: the sampled tokens, their logprobs, the top k (plus the sampled
    token, as vLLM lists it) per position, and where each token's text starts in the choice's text
    (text_start: characters before the completion, an echoed prompt)."""
    offset = text_start + sum(len(entry[t].decoded_token or "")
                              for t, entry in zip(c.token_ids[:start], (c.logprobs or [])[:start]))
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        chosen = entry[token_id]
        tokens.append(chosen.decoded_token or "")
        offsets.append(offset)
        offset += len(tokens[-1])
        token_lps.append(chosen.logprob)
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
        top = {(lp.decoded_token or ""): lp.logprob for _, lp in ranked}
        top.setdefault(chosen.decoded_token or "", chosen.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(entries: list | None) -> list | None:
    """vLLM's prompt_logprobs field: per prompt token None (the first) or {token id: logprob, rank, text}."""
    if entries is None:
        return None
    return [None if entry is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in entries]


def echo_logprobs(prompt_ids: list[int], entries: list | None, k: int, first_token_text: str) -> dict:
    """Completions logprobs of an echoed prompt: its tokens, with no logprob for the first."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for position, token_id in enumerate(prompt_ids):
        entry = entries[position] if entries is not None else None
        if entry is None:
            tokens.append(first_token_text if position == 0 else "")
            token_lps.append(None)
            tops.append(None)
        else:
            chosen = entry[token_id]
            tokens.append(chosen.decoded_token or "")
            token_lps.append(chosen.logprob)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
            top = {(lp.decoded_token or ""): lp.logprob for _, lp in ranked}
            top.setdefault(chosen.decoded_token or "", chosen.logprob)
            tops.append(top)
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def merge_logprobs(first: dict, then: dict) -> dict:
    return {key: first[key] + then[key] for key in first}


def chat_logprobs(c: CompletionOutput, start: int, end: int, k: int) -> dict:
    content = []
    for token_id, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        chosen = entry[token_id]
        token = chosen.decoded_token or ""
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
        content.append({"token": token, "logprob": chosen.logprob, "bytes": list(token.encode()),
                         "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                                           "bytes": list((lp.decoded_token or "").encode())} for _, lp in ranked]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """cached_tokens: the prompt tokens served from the prefix cache, where the server reports them."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


class DeltaTracker:
    """What of each choice's cumulative text has been sent. While a choice runs, the last
    (longest stop string - 1) characters are held back: they may turn out to start a stop string."""

    def __init__(self, holdback: int, per_token: bool):
        self.holdback = holdback
        self.per_token = per_token  # every new token is worth a chunk (logprobs wanted, or no text)
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def delta(self, index: int, c: CompletionOutput) -> tuple[str, int, int, bool] | None:
        """(new text, first new token, end token, finished now) or None if nothing to send."""
        if index in self.finished:
            return None
        done = c.finish_reason is not None
        sent = self.sent_text.get(index, 0)
        upto = len(c.text) if done else max(sent, len(c.text) - self.holdback)
        tok_start = self.sent_tokens.get(index, 0)
        if upto == sent and not done and (not self.per_token or len(c.token_ids) == tok_start):
            return None
        self.sent_text[index], self.sent_tokens[index] = upto, len(c.token_ids)
        if done:
            self.finished.add(index)
        return c.text[sent:upto], tok_start, len(c.token_ids), done


class RunningUsage:
    """stream_options.continuous_usage_stats: every chunk carries the usage so far (the tokens generated by
    each choice up to that chunk)."""

    def __init__(self, options, prompt_tokens: int):
        self.on = bool(options and options.continuous_usage_stats)
        self.prompt_tokens = prompt_tokens
        self.generated: dict[int, int] = {}

    def of(self, index: int, num_tokens: int) -> dict:
        if not self.on:
            return {}
        self.generated[index] = num_tokens
        return {"usage": usage(self.prompt_tokens, sum(self.generated.values()))}
