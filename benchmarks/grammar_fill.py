"""Host time a step to fill the grammar bitmasks of R structured-output requests (JSON object, a JSON schema and a
regex in turns, each walked to its own state by random allowed tokens), in the engine's thread and by xgrammar's
threads (GrammarCompiler.next_bitmasks). The vocabulary is synthetic and byte-level, of Qwen3's size by default:
a bitmask's cost grows with the tokens a grammar state must check, which a small test tokenizer understates.

  python benchmarks/grammar_fill.py [--rows 1,32,256,1024] [--vocab 151936] [--threads 1,2,4,8] [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import string
import sys
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.layers.sampler import unpack_bitmask  # noqa: E402
from sageinfer.sampling_params import StructuredOutputsParams  # noqa: E402
from sageinfer.structured_output import grammar as grammar_module  # noqa: E402

SCHEMA = {"type": "object", "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level: the 256 bytes, then random pieces of letters, digits, JSON punctuation and spaces."""
    rng = random.Random(seed)
    letters, symbols = string.ascii_letters + string.digits, ' {}[]":,.-_'
    vocab = {bytes([b]).decode("latin-1"): b for b in range(256)}
    while len(vocab) < vocab_size - 1:
        piece = "".join(rng.choice(letters if rng.random() < 0.9 else symbols)
                        for _ in range(rng.choice([2, 3, 3, 4, 4, 5, 6, 7, 8, 10])))
        vocab.setdefault(("Ġ" if rng.random() < 0.4 else "") + piece, len(vocab))
    vocab["</s>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


def walked_grammars(compiler, rows: int, eos: int, seed: int = 0) -> list:
    specs = [StructuredOutputsParams(json_object=True), StructuredOutputsParams(json=SCHEMA),
             StructuredOutputsParams(regex=r"[a-z]{3,8}-[0-9]{2,5}")]
    rng = np.random.default_rng(seed)
    grammars = []
    for i in tqdm(range(rows), desc="grammars", leave=False):
        g = compiler.matcher(compiler.compile(specs[i % len(specs)]))
        for _ in range(int(rng.integers(0, 12))):
            allowed = unpack_bitmask(__import__("torch").from_numpy(compiler.next_bitmasks([g])), compiler.vocab_size)
            tokens = [t for t in allowed[0].nonzero().flatten().tolist() if t != eos]
            if not tokens:
                break
            g.accept(int(rng.choice(tokens)))
        grammars.append(g)
    return grammars


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,32,256,1024")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import xgrammar as xgr
    vocab = args.vocab
    compiler = grammar_module.GrammarCompiler(synthetic_tokenizer(vocab), vocab, {vocab - 1})
    rows_list, threads_list = [int(r) for r in args.rows.split(",")], [int(t) for t in args.threads.split(",")]
    grammars = walked_grammars(compiler, max(rows_list), vocab - 1)
    print(f"grammar bitmasks, ms a step (vocabulary {vocab}, {os.cpu_count()} CPUs, median of {args.repeats}; "
          f"the engine fills in {grammar_module.FILL_THREADS} threads from {grammar_module.THREADED_FILL_MIN_ROWS} "
          f"rows)")
    print("| rows | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads_list) + " |")
    print("| --- |" + " --- |" * len(threads_list))
    for rows in rows_list:
        times = []
        for threads in threads_list:
            fill = xgr.BatchGrammarMatcher(max_threads=threads)
            masks = xgr.allocate_token_bitmask(rows, vocab)
            matchers = [g._matcher for g in grammars[:rows]]
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fill.batch_fill_next_token_bitmask(matchers, masks)
                runs.append((time.perf_counter() - start) * 1e3)
            times.append(statistics.median(runs))
        print(f"| {rows} | " + " | ".join(f"{t:.2f}" for t in times) + " |")


if __name__ == "__main__":
    main()
