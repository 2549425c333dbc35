"""Default sampling values from a checkpoint's generation_config.json, for requests that give none
(vLLM's --generation-config: "auto" reads the model's, "vllm" uses none, or a directory's)."""
from __future__ import annotations

import json
import os

# generation_config.json key -> SamplingParams field
_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
         "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_defaults(model_dir: str, source: str) -> dict:
    if source == "vllm":
        return {}
    directory = model_dir if source == "auto" else source
    if source != "auto" and not os.path.isdir(directory):
        raise ValueError(f"generation_config must be auto, vllm or a directory with generation_config.json; "
                         f"no such directory {source!r}")
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    if raw.get("do_sample") is False:  # the checkpoint asks for greedy decoding
        raw = {**raw, "temperature": 0.0}
    return {field: raw[key] for key, field in _KEYS.items() if raw.get(key) is not None}
