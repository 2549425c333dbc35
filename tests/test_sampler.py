"""The sampler alone: filters, penalties and seeded draws on hand-made logits, on both of its paths (a draw
among each row's top-k, and over the sorted vocabulary)."""
import pytest
import torch

from sageinfer.layers import sampler
from sageinfer.layers.sampler import Sampler, SamplingBatch, apply_penalties

V = 10


@pytest.fixture(params=["top-k", "sorted"])
def path(request, monkeypatch):
    """Each test of the draw on both paths: with a bound of 0 no row's top-k is small enough to draw among."""
    monkeypatch.setattr(sampler, "TOP_K_DRAW_MAX", 1024 if request.param == "top-k" else 0)
    return request.param


def _batch(rows, temperature=1.0, top_k=V, top_p=1.0, min_p=0.0, generators=None, vocab=V):
    return SamplingBatch(
        temperature=torch.full((rows,), temperature), top_k=torch.full((rows,), top_k, dtype=torch.int64),
        top_p=torch.full((rows,), top_p), min_p=torch.full((rows,), min_p),
        generators=generators or [None] * rows, all_greedy=temperature == 0.0,
        top_k_host=[0 if temperature == 0.0 else top_k] * rows,
        needs_filter=top_k < vocab or top_p < 1.0 or min_p > 0.0, needs_sort=top_k < vocab or top_p < 1.0)


def _draw_counts(logits_row, draws=4000, **kwargs):
    torch.manual_seed(0)
    logits = logits_row.unsqueeze(0).repeat(draws, 1)
    tokens = Sampler()(logits, _batch(draws, **kwargs)).token_ids
    return torch.bincount(tokens, minlength=V)


LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])


def test_greedy_takes_the_argmax():
    logits = torch.randn(5, V)
    assert torch.equal(Sampler()(logits, _batch(5, temperature=0.0)).token_ids, logits.argmax(-1))


def test_greedy_rows_among_drawing_ones_take_the_argmax(path):
    logits = torch.randn(6, V) * 3
    b = _batch(6, temperature=1.0, top_k=4)
    b.temperature[::2] = 0.0
    b.top_k_host = [0, 4, 0, 4, 0, 4]
    tokens = Sampler()(logits, b).token_ids
    assert torch.equal(tokens[::2], logits[::2].argmax(-1))


def test_top_k_samples_only_the_k_most_likely(path):
    counts = _draw_counts(LOGITS, top_k=3)
    assert counts[3:].sum() == 0 and (counts[:3] > 0).all()


def test_top_p_samples_only_the_nucleus(path):
    probs = LOGITS.softmax(-1)
    # Smallest prefix whose mass reaches 0.8
    nucleus = int((probs.cumsum(-1) < 0.8).sum()) + 1
    counts = _draw_counts(LOGITS, top_p=0.8)
    assert counts[nucleus:].sum() == 0 and (counts[:nucleus] > 0).all()


def test_min_p_drops_tokens_below_the_fraction_of_the_top(path):
    probs = LOGITS.softmax(-1)
    allowed = probs >= 0.2 * probs[0]
    counts = _draw_counts(LOGITS, min_p=0.2)
    assert counts[~allowed].sum() == 0 and (counts[allowed] > 0).all()


def test_unfiltered_sampling_follows_the_softmax(path):
    counts = _draw_counts(LOGITS, draws=20000)
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, LOGITS.softmax(-1), atol=0.015)


def test_temperature_flattens_the_distribution(path):
    hot = _draw_counts(LOGITS, temperature=5.0)
    cold = _draw_counts(LOGITS, temperature=0.3)
    assert hot[0] < cold[0] and hot[5:].sum() > cold[5:].sum()


def test_seeded_rows_draw_the_same_tokens_in_any_batch(path):
    logits = torch.randn(1, V)
    alone = [Sampler()(logits, _batch(1, generators=[torch.Generator().manual_seed(7)])).token_ids.item()
             for _ in range(1)]
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = [Sampler()(logits, _batch(1, generators=[gen_a])).token_ids.item() for _ in range(20)]
    mixed = []
    for _ in range(20):
        batch_logits = torch.cat([torch.randn(3, V), logits])
        mixed.append(Sampler()(batch_logits, _batch(4, generators=[None, None, None, gen_b])).token_ids[3].item())
    assert first == mixed and alone[0] == first[0]


def _penalty_batch(presence=0.0, frequency=0.0, repetition=1.0, output_counts=None, prompt_mask=None):
    b = _batch(1)
    b.presence_penalty = torch.tensor([presence])
    b.frequency_penalty = torch.tensor([frequency])
    b.repetition_penalty = torch.tensor([repetition])
    b.output_token_counts = output_counts if output_counts is not None else torch.zeros(1, V)
    b.prompt_token_mask = prompt_mask if prompt_mask is not None else torch.zeros(1, V, dtype=torch.bool)
    return b


def test_frequency_and_presence_penalties_subtract_as_defined():
    counts = torch.zeros(1, V)
    counts[0, 2] = 3
    counts[0, 5] = 1
    logits = torch.ones(1, V)
    out = apply_penalties(logits, _penalty_batch(presence=0.5, frequency=0.25, output_counts=counts))
    expected = torch.ones(1, V)
    expected[0, 2] -= 0.5 + 0.75
    expected[0, 5] -= 0.5 + 0.25
    assert torch.allclose(out, expected)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0] + [0.0] * (V - 4)])
    prompt_mask = torch.zeros(1, V, dtype=torch.bool)
    prompt_mask[0, 0] = prompt_mask[0, 1] = True
    out = apply_penalties(logits, _penalty_batch(repetition=2.0, prompt_mask=prompt_mask))
    assert out[0, :4].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_logprobs_report_sampled_token_and_top_k():
    logits = torch.randn(2, V)
    b = _batch(2, temperature=0.0)
    b.max_num_logprobs = 3
    out = Sampler()(logits, b)
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs[:, 0], ref.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.allclose(out.logprobs[:, 1:], ref.topk(3, dim=-1).values)
    assert out.sampled_ranks.tolist() == [1, 1]


def test_logit_bias_and_allowed_token_ids_steer_the_draw():
    logits = LOGITS.unsqueeze(0).repeat(3, 1)
    b = _batch(3, temperature=0.0)
    b.bias_rows, b.bias_tokens = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 7])
    b.bias_values = torch.tensor([-100.0, -100.0, 100.0])
    b.allowed_mask = torch.ones(3, V, dtype=torch.bool)
    b.allowed_mask[2] = False
    b.allowed_mask[2, [4, 5]] = True
    out = Sampler()(logits, b)
    assert out.token_ids.tolist() == [1, 7, 4]  # argmax banned; a token forced; the best allowed one


def _every_option_batch(rows, seed):
    """Rows of every kind: greedy and seeded draws, top-k / top-p / min-p, penalties, bans, bias, allowed
    tokens, a grammar's bitmask and logprobs."""
    rng = torch.Generator().manual_seed(seed)
    b = _batch(rows, temperature=0.8, top_k=6, top_p=0.9, min_p=0.02,
               generators=[torch.Generator().manual_seed(100 + r) for r in range(rows)])
    b.temperature[::3] = 0.0  # greedy rows among the drawn ones
    b.top_k_host = [0 if row % 3 == 0 else 6 for row in range(rows)]
    b.all_greedy = False
    b.presence_penalty, b.frequency_penalty = torch.rand(rows, generator=rng), torch.rand(rows, generator=rng)
    b.repetition_penalty = 1.0 + torch.rand(rows, generator=rng)
    b.output_token_counts = torch.randint(0, 3, (rows, V), generator=rng).float()
    b.prompt_token_mask = torch.rand(rows, V, generator=rng) < 0.3
    b.banned_rows, b.banned_tokens = torch.tensor([9, 0, 4, 4, 10]), torch.tensor([1, 2, 3, 0, 5])  # unsorted rows
    b.bias_rows, b.bias_tokens = torch.tensor([5, 1, 8]), torch.tensor([7, 7, 2])
    b.bias_values = torch.tensor([3.0, -2.0, 50.0])
    b.allowed_mask = torch.ones(rows, V, dtype=torch.bool)
    b.allowed_mask[2, :5] = False
    b.grammar_bitmask = torch.full((rows, 1), -1, dtype=torch.int32)
    b.grammar_bitmask[7] = 0b1100  # row 7 may draw tokens 2 and 3 only
    b.max_num_logprobs = 3
    return b


def test_a_batch_sampled_in_chunks_of_rows_samples_what_it_samples_whole(monkeypatch):
    from sageinfer.layers import sampler
    rows = 11
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(3))
    whole = Sampler()(logits, _every_option_batch(rows, 0))
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_ROWS", 4)
    calls = []
    sample = Sampler._sample
    monkeypatch.setattr(Sampler, "_sample", lambda self, lg, b: calls.append(lg.shape[0]) or sample(self, lg, b))
    chunked = Sampler()(logits, _every_option_batch(rows, 0))
    assert calls == [4, 4, 3]
    for name in ("token_ids", "logprobs", "logprob_token_ids", "sampled_ranks"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert chunked.token_ids[7].item() in (2, 3) and chunked.token_ids[8].item() == 2  # the grammar; the bias
    assert chunked.token_ids[2].item() >= 5  # allowed tokens only

    calls.clear()  # a plain greedy batch makes no [rows, vocab] buffers: one argmax, whole
    assert torch.equal(Sampler()(logits, _batch(rows, temperature=0.0)).token_ids, logits.argmax(-1))
    assert calls == [rows]


def _old_style_draw(logits, temperature, top_k, top_p, min_p, gen):
    """The draw over the vocabulary in token order (the sampler before a small top-k drew among its tokens):
    filtered probabilities scattered back to token order, one noise value per token from the generator."""
    probs = (logits / temperature).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    ranks = torch.arange(probs.shape[-1])
    sorted_probs = sorted_probs * (ranks < top_k)
    cum_before = (sorted_probs.cumsum(-1) - sorted_probs) / sorted_probs.sum()
    keep = (ranks < top_k) & (cum_before < top_p) & (sorted_probs >= min_p * sorted_probs[0])
    keep[0] = True
    filtered = torch.zeros_like(probs).scatter_(0, order, sorted_probs * keep)
    return int((filtered / torch.empty_like(probs).exponential_(generator=gen)).argmax())


def test_seeded_rows_draw_the_same_tokens_on_either_path(monkeypatch):
    """A seeded row with a small top-k draws the same tokens among its top-k as in a batch that sorts the
    vocabulary (another row has no top-k); a seeded row without one draws as the vocabulary-order draw did."""
    vocab, steps = 64, 25
    monkeypatch.setattr(sampler, "TOP_K_DRAW_MAX", 16)
    rng = torch.Generator().manual_seed(5)
    logits = [torch.randn(vocab, generator=rng) * 2 for _ in range(steps)]

    def run(top_k, companion_top_k):
        gen = torch.Generator().manual_seed(11)
        tokens = []
        for step_logits in logits:
            b = _batch(2, temperature=0.9, top_p=0.85, min_p=0.02, generators=[gen, None], vocab=vocab)
            b.top_k = torch.tensor([top_k, companion_top_k])
            b.top_k_host = [top_k, companion_top_k]
            tokens.append(Sampler()(torch.stack([step_logits, torch.randn(vocab)]), b).token_ids[0].item())
        return tokens

    among_top_k = run(12, 8)  # both rows' top-k at most 16: drawn among 12 tokens
    sorted_vocab = run(12, vocab)  # the other row has none: the vocabulary sorted
    assert among_top_k == sorted_vocab
    assert len(set(among_top_k)) > 3  # draws, not the argmax each step
    gen = torch.Generator().manual_seed(11)
    old = [_old_style_draw(step, 0.9, vocab, 0.85, 0.02, gen) for step in logits]
    assert run(vocab, 8) == old  # no top-k: token order, as before


def test_a_batch_of_small_top_ks_sorts_no_vocabulary(monkeypatch):
    """Drawing among the top-k takes one top-k of the logits; with a larger top-k the vocabulary is sorted."""
    vocab = 4096
    sorts = []
    sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(self.shape) or sort(self, *a, **k))
    logits = torch.randn(8, vocab)
    tokens = Sampler()(logits, _batch(8, top_k=20, top_p=0.95, vocab=vocab)).token_ids
    assert sorts == [] and (logits.gather(1, tokens[:, None]) >= logits.topk(20).values[:, -1:]).all()
    Sampler()(logits, _batch(8, top_k=sampler.TOP_K_DRAW_MAX + 1, top_p=0.95, vocab=vocab))
    assert sorts == [torch.Size([8, vocab])]


def test_the_batch_holds_each_drawing_rows_top_k_on_the_host():
    """What the sampler decides its path by, without reading the device: each drawing row's top-k (the
    vocabulary when it has none or one past it), 0 for greedy rows."""
    import types

    from sageinfer.executor.sampling_inputs import build_sampling_batch
    from sageinfer.sampling_params import SamplingParams
    def batch(params):
        requests = [types.SimpleNamespace(sampling_params=p, generator=None, num_output_tokens=1, eos_token_ids=set(),
                                          output_token_ids=[0], grammar_bitmask=None, num_pending_tokens=0)
                    for p in params]
        return build_sampling_batch(requests, 40, torch.device("cpu"), lambda a, d: torch.as_tensor(a).to(d), None)

    b = batch([SamplingParams(temperature=0.0, top_k=5), SamplingParams(temperature=0.7, top_k=20),
               SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=45)])
    assert b.top_k_host == [0, 20, 40, 40] and b.top_k.tolist() == [5, 20, 40, 40] and b.needs_sort
    b = batch([SamplingParams(temperature=0.0, top_k=5), SamplingParams(temperature=0.7, min_p=0.1),
               SamplingParams(temperature=0.7)])  # min-p alone among the drawing rows: no sort
    assert b.needs_filter and not b.needs_sort


def test_min_p_alone_draws_what_the_sorted_draw_draws_without_sorting(monkeypatch):
    """Min-p keeps a fraction of each row's top probability: a threshold, so a batch whose drawing rows filter by
    min-p alone sorts nothing, and its seeded rows draw the tokens they draw when the vocabulary is sorted."""
    vocab = 2048
    sorts = []
    sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(self.shape) or sort(self, *a, **k))
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2)) * 3

    def draws(needs_sort):
        b = _batch(6, temperature=0.8, top_k=vocab, min_p=0.05, vocab=vocab,
                   generators=[torch.Generator().manual_seed(20 + r) for r in range(6)])
        b.needs_sort = needs_sort
        return Sampler()(logits, b).token_ids.tolist()

    by_threshold = draws(False)
    assert sorts == []
    assert draws(True) == by_threshold and sorts == [torch.Size([6, vocab])]
    probs = (logits / 0.8).softmax(-1)
    allowed = probs >= 0.05 * probs.amax(-1, keepdim=True)
    assert allowed[torch.arange(6), torch.tensor(by_threshold)].all() and (allowed.sum(-1) < vocab // 10).all()


def test_the_threshold_kernel_draws_the_sorted_draws_seeded_tokens_and_sorts_nothing(monkeypatch):
    """With the threshold kernel (the Triton platforms' path) a batch that has a top-p or a large top-k sorts
    nothing, and its seeded rows draw what they draw when the vocabulary is sorted: a row without a top-k as
    the token-order draw, a small top-k's row its noise in rank order on its k best tokens. A batch of fewer
    rows than THRESHOLD_KERNEL_MIN_ROWS still sorts."""
    from kernels_util import DEVICE  # the kernel runs compiled on a GPU, in the interpreter on a CPU
    vocab, steps = 700, 4
    monkeypatch.setattr(sampler, "TOP_K_DRAW_MAX", 16)
    monkeypatch.setattr(sampler, "THRESHOLD_KERNEL_MIN_ROWS", 5)
    rng = torch.Generator().manual_seed(8)
    logits = [(torch.randn(5, vocab, generator=rng) * 3).to(DEVICE) for _ in range(steps)]
    top_k, top_p = [vocab, 12, 300, vocab, 5], [0.9, 0.8, 1.0, 1.0, 1.0]

    def run(threshold_kernel):
        gens = [torch.Generator(device=DEVICE).manual_seed(30 + r) for r in range(5)]
        tokens = []
        for step_logits in logits:
            b = _batch(5, temperature=0.7, generators=list(gens), vocab=vocab)
            b.top_k, b.top_p, b.top_k_host = torch.tensor(top_k), torch.tensor(top_p), top_k[:4] + [0]
            b.min_p[3] = 0.05
            b.temperature[4] = 0.0  # a greedy row among them
            b.needs_filter = b.needs_sort = True
            for name in ("temperature", "top_k", "top_p", "min_p"):
                setattr(b, name, getattr(b, name).to(DEVICE))
            tokens.append(Sampler(threshold_kernel=threshold_kernel)(step_logits, b).token_ids.tolist())
        return tokens

    by_sort = run(False)
    sorts = []
    sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(self.shape) or sort(self, *a, **k))
    by_threshold = run(True)
    assert sorts == [] and by_threshold == by_sort
    monkeypatch.setattr(sampler, "THRESHOLD_KERNEL_MIN_ROWS", 6)
    assert run(True) == by_sort and sorts == [torch.Size([5, vocab])] * steps
    assert [row[4] for row in by_threshold] == [int(step[4].argmax()) for step in logits]
    assert len({row[0] for row in by_threshold}) > 1  # draws, not the argmax each step
