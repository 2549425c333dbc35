"""Multi-turn conversations: the traffic where a prefix cache, and a router that knows where each
conversation's prefix is cached, pay off.

Each session opens with a prefix of its own (a system prompt and a document, --input-len tokens);
every turn sends the whole conversation so far (the previous prompt, an answer of --output-len
tokens standing for the model's, and a new user message of --user-len tokens) and waits for its
answer before the next turn. Sessions run side by side (--max-concurrency of them at a time), each
sending its session id as the request's `user` field. The report splits TTFT between first turns
(nothing cached) and later ones (the conversation so far cached, where it was kept).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
from tqdm.auto import tqdm

from sageinfer.bench.serve import RequestResult, _one, _stats


def conversations(num_sessions: int, turns: int, prefix_len: int, user_len: int, answer_len: int,
                  vocab_size: int, seed: int) -> list[list[list[int]]]:
    """Per session, the prompt (token ids) of each turn; turn t's prompt starts with turn t-1's."""
    if min(num_sessions, turns, prefix_len, user_len) < 1 or answer_len < 0:
        raise ValueError("sessions, turns, the prefix and user message lengths must be >= 1")
    rng = np.random.default_rng(seed)
    low, high = (1000, vocab_size - 1000) if vocab_size > 2000 else (vocab_size // 4, 3 * vocab_size // 4)
    sessions = []
    for _ in range(num_sessions):
        prompt = rng.integers(low, high, prefix_len + user_len).tolist()
        prompts = [prompt]
        for _ in range(turns - 1):
            prompt = prompt + rng.integers(low, high, answer_len + user_len).tolist()
            prompts.append(prompt)
        sessions.append(prompts)
    return sessions


async def run_conversations(base_url: str, model: str, sessions: list[list[list[int]]], output_len: int,
                            max_concurrency: int | None, api_key: str | None,
                            show_progress: bool = True, text: bool = False) -> tuple[list[list[RequestResult]], float]:
    """Each session's turns one after another; sessions side by side. Returns the results by session."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency or len(sessions))
    bar = tqdm(total=sum(len(s) for s in sessions), desc="Turns", unit="req", disable=not show_progress)
    limits = httpx.Limits(max_connections=(max_concurrency or len(sessions)) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        async def converse(index: int, prompts: list[list[int]]) -> list[RequestResult]:
            results = []
            async with limit:
                for prompt in prompts:
                    result = await _one(http, url, headers, model, prompt, output_len,
                                        extra={"user": f"session-{index}"}, text=text)
                    results.append(result)
                    bar.update(1)
                    if not result.ok:
                        break  # a conversation whose turn failed ends there
            return results

        start = time.perf_counter()
        by_session = await asyncio.gather(*(converse(i, s) for i, s in enumerate(sessions)))
        duration = time.perf_counter() - start
    bar.close()
    return list(by_session), duration


def turn_split(by_session: list[list[RequestResult]]) -> dict:
    """TTFT of first turns and of later turns."""
    first = [s[0].ttft for s in by_session if s and s[0].ok]
    later = [r.ttft for s in by_session for r in s[1:] if r.ok]
    return {"first_turn_ttft_ms": _stats(first), "later_turn_ttft_ms": _stats(later)}
