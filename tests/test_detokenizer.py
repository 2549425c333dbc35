"""The incremental detokenizer's Rust path (DecodeStream) streams exactly the text of the window
method it replaces, token by token, on a byte-level BPE (GPT-2, Qwen) and on a metaspace BPE with
byte fallback (Llama 2, Mistral), Chinese, emoji and special tokens included."""
import numpy as np
import pytest

from sageinfer.engine.detokenizer import IncrementalDetokenizer
from sageinfer.models.tiny import SPECIAL_TOKENS, build_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 Emoji 🦊🐶 and café, naïve; "
        "numbers 12345 and code `x = f(y)`. ") * 8


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox and the lazy dog jumps over numbers and code"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    return build_tokenizer() if request.param == "byte-level" else _metaspace_tokenizer()


def _stream(tokenizer, prompt, output, skip_special, rust, streamed=None):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special, [], False)
    if not rust:
        detok.stream = None
    elif streamed is not None:
        streamed.append(detok.stream is not None)
    texts = []
    for token in output:
        detok.add_token(token, check_stop=False)
        texts.append(detok.text)
    detok.flush()
    return texts, detok.text


@pytest.mark.parametrize("skip_special", [True, False])
def test_the_rust_stream_gives_the_window_methods_text_at_every_token(tokenizer, skip_special):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    special = [tokenizer.convert_tokens_to_ids(t) for t in (SPECIAL_TOKENS[1:] if "<|im_start|>" in tokenizer.get_vocab()
                                                             else ["<s>", "</s>"])]
    rng = np.random.default_rng(0)
    cases = [(ids[:7], ids[7:300]), ([], ids[:50])]
    for _ in range(20):  # cuts anywhere (inside multi-byte characters too), special tokens here and there
        cut = int(rng.integers(1, len(ids) - 60))
        out = list(ids[cut:cut + 60])
        for pos in rng.integers(0, len(out), size=2):
            out.insert(int(pos), special[int(rng.integers(len(special)))])
        cases.append((ids[max(cut - 9, 0):cut], out))
    cases.append((ids[:5], rng.integers(0, len(tokenizer), size=80).tolist()))  # nonsense ids: byte soup
    streamed = []
    for prompt, output in cases:
        assert _stream(tokenizer, prompt, output, skip_special, True, streamed) == \
            _stream(tokenizer, prompt, output, skip_special, rust=False)
    # half or more went through the Rust stream (not those cut inside a character: windows decode those)
    assert sum(streamed) >= len(cases) // 2


def test_a_slow_tokenizer_decodes_windows(tokenizer):
    class Slow:  # any tokenizer without a Rust one behind it
        def decode(self, ids, skip_special_tokens=False):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:40]
    detok = IncrementalDetokenizer(Slow(), [], True, [], False)
    assert detok.stream is None
    for token in ids:
        detok.add_token(token, check_stop=False)
    detok.flush()
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"], show_progress=False)
    tok.train_from_iterator(["it's done. isn't it? yes, we're here! i'm sure they've gone ."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


def test_a_tokenizer_set_to_clean_up_spaces_streams_only_where_its_decode_cleans_nothing():
    """Llama 3's tokenizer config asks for the clean-up of spaces, which transformers skips for a BPE model: such a
    tokenizer streams in Rust, and its text is the tokenizer's decode. A WordPiece one does clean up: it decodes
    windows through its own decode, never the Rust one."""
    text = "it's done. isn't it? yes, we're here! i'm sure they've gone ."
    bpe = build_tokenizer()
    bpe.clean_up_tokenization_spaces = True
    ids = bpe.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe, ids[:3], True, [], False)
    assert detok.stream is not None and detok.rust is not None
    for token in ids[3:]:
        detok.add_token(token, check_stop=False)
    detok.flush()
    assert detok.text == bpe.decode(ids[3:], skip_special_tokens=True)

    wordpiece = _wordpiece_tokenizer()
    ids = wordpiece.encode(text, add_special_tokens=False)
    assert wordpiece.decode(ids) != wordpiece.backend_tokenizer.decode(ids)  # it does clean up: "done." not "done ."
    detok = IncrementalDetokenizer(wordpiece, ids[:3], True, [], False)
    assert detok.stream is None and detok.rust is None


def test_a_tokens_text_alone_is_its_decode_and_is_decoded_once_per_tokenizer(tokenizer, monkeypatch):
    """Logprobs name each top token of each position: a token's text is decoded once per tokenizer and then read
    back, by every request's detokenizer."""
    ids = list(range(0, len(tokenizer), 7))
    expected = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    first = IncrementalDetokenizer(tokenizer, [], True, [], False)
    assert [first.decode_token(t) for t in ids] == expected
    calls = []
    decode = type(tokenizer).decode
    monkeypatch.setattr(type(tokenizer), "decode", lambda self, *a, **k: calls.append(a) or decode(self, *a, **k))
    second = IncrementalDetokenizer(tokenizer, [], True, [], False)
    second.rust = None  # a decode would now go through the spied Hugging Face one
    assert [second.decode_token(t) for t in ids] == expected and calls == []
