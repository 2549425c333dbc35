"""A copy of a model directory (its config, links to its weights) with a word-level tokenizer whose word "t<i>" is token i, so that a
benchmark with dummy weights (no real tokenizer) can send its random token ids as text: routers that
match prompts by text (SGLang's cache-aware policy) then see the same prefixes the engines cache.

    python3 benchmarks/word_tokenizer.py sageinfer/bench/standard/qwen3-8b /tmp/qwen3-8b-words
"""
import argparse
import json
import os
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def write(model_dir: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(model_dir, "config.json"), out_dir)
    for name in os.listdir(model_dir):  # the weights, where there are any, stay where they are
        if name.endswith(".safetensors") and not os.path.exists(os.path.join(out_dir, name)):
            os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(out_dir, name))
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}, f)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    print(write(args.model_dir, args.out_dir))
