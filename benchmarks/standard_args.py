"""The engine flags of the benchmark scripts, defaulting to the standard workloads' setting: Qwen3-8B
shapes with dummy weights and the scheduler limits vLLM is compared at."""
from __future__ import annotations

import os

from sageinfer.bench.workloads import STANDARD_DIR
from sageinfer.gateway.engine_args import add_engine_args


def add_standard_engine_args(parser) -> None:
    add_engine_args(parser)
    parser.set_defaults(model=os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
                        max_num_seqs=1024, max_num_batched_tokens=16384)
