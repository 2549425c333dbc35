"""Host time a generated token spends in the incremental detokenizer (every token of every running request passes
there on the engine's loop), for a byte-level BPE tokenizer (as Qwen's and Llama 3's), by each of its methods:
the Rust stream (DecodeStream), windows decoded by the Rust tokenizer, and windows decoded by the Hugging Face
tokenizer (what a tokenizer whose config asks for the clean-up of spaces, as Llama 3's does, took before the
detokenizer saw that transformers cleans nothing up for a BPE model); and a logprob token's text, decoded each time
(by the Hugging Face tokenizer, as before, or the Rust one) or read from the tokenizer's cache of single tokens.

  python benchmarks/detokenize_speed.py [--tokens 20000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from sageinfer.models.tiny import build_tokenizer  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. It's done, isn't it? 敏捷的棕色狐狸跳过了懒狗。 "
        "Numbers 12345 and code `x = f(y)`. ")


def _per_token_us(tokenizer, ids: list[int], method: str) -> float:
    detok = IncrementalDetokenizer(tokenizer, ids[:5], True, [], False)
    if method != "stream":
        detok.stream = None
    if method == "windows, Hugging Face decode":
        detok.rust = None
    start = time.perf_counter()
    for token in ids[5:]:
        detok.add_token(token, check_stop=False)
    return (time.perf_counter() - start) / (len(ids) - 5) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True  # as Llama 3's config: transformers skips it for BPE
    ids = tokenizer.encode(TEXT * (args.tokens // 30 + 1), add_special_tokens=False)[:args.tokens]
    takes = "stream" if IncrementalDetokenizer(tokenizer, ids[:5], True, [], False).stream else "windows"
    print(f"incremental detokenizer, us a token ({len(ids)} tokens, byte-level BPE, clean-up set in its config;"
          f" the detokenizer now takes: {takes})")
    print("| method | us a token |")
    print("| --- | --- |")
    for method in ("stream", "windows, Rust decode", "windows, Hugging Face decode"):
        print(f"| {method} | {min(_per_token_us(tokenizer, ids, method) for _ in range(3)):.2f} |")
    # Logprobs: each position names its sampled and top tokens, decoded alone (cached per tokenizer now).
    detok = IncrementalDetokenizer(tokenizer, [], True, [], False)
    for name, run in (("a logprob token's text, Hugging Face decode", lambda t: tokenizer.decode([t])),
                      ("a logprob token's text, Rust decode", lambda t: detok.rust.decode([t])),
                      ("a logprob token's text, cached", detok.decode_token)):
        for t in ids:  # every token seen once (the cache's first fills)
            run(t)
        start = time.perf_counter()
        for t in ids:
            run(t)
        print(f"| {name} | {(time.perf_counter() - start) / len(ids) * 1e6:.2f} |")


if __name__ == "__main__":
    main()
