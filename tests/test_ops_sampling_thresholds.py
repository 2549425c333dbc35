"""The threshold kernel (ops/sampling_thresholds.py) against its reference, the sorted filter: the same kept
tokens for top-k, top-p and min-p, and the same draw for the same noise."""
import pytest
import torch

from kernels_util import DEVICE
from sageinfer.layers.sampler import SamplingBatch, filter_sorted
from sageinfer.ops.sampling_thresholds import threshold_draw


def _sorted_keep(probs, top_k, top_p, min_p):
    """Tokens the sorted filter keeps with a probability above 0, in token order."""
    rows = probs.shape[0]
    batch = SamplingBatch(temperature=torch.ones(rows), top_k=top_k, top_p=top_p, min_p=min_p,
                          generators=[None] * rows, all_greedy=False, needs_filter=True)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    return torch.zeros_like(probs).scatter(1, order, filter_sorted(sorted_probs, batch)) > 0


def _rows(vocab, seed):
    """Peaked and flat rows, one with most tokens masked out (probability 0), and the settings served with:
    top-k alone (small, large, the whole vocabulary but one), top-p alone, both, min-p, and none."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([4.0, 0.5, 2.0, 8.0, 1.0, 3.0, 0.2, 2.5, 1.5])
    logits = torch.randn(len(scales), vocab, generator=gen) * scales[:, None]
    logits[5, vocab // 7:] = float("-inf")
    probs = logits.softmax(dim=-1)
    top_k = torch.tensor([vocab, 7, vocab - 1, vocab, 300, vocab, 1, 40, vocab])
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.5, 0.95, 0.8, 1.0, 0.7, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.1, 0.0])
    return probs, top_k, top_p, min_p


@pytest.mark.parametrize("vocab", [1000, 1537])  # one and several blocks, not a multiple of one
def test_kept_tokens_and_draw_match_the_sorted_filter(vocab):
    probs, top_k, top_p, min_p = _rows(vocab, seed=vocab)
    noise = torch.empty_like(probs).exponential_(generator=torch.Generator().manual_seed(1))
    tokens, thresholds = threshold_draw(*(t.to(DEVICE) for t in (probs, noise, top_k, top_p, min_p)))
    tokens, thresholds = tokens.cpu(), thresholds.cpu()
    expected = _sorted_keep(probs, top_k, top_p, min_p)
    kept = (probs >= thresholds[:, None]) & (probs > 0)
    assert torch.equal(kept, expected), (kept.sum(1), expected.sum(1))
    assert kept.sum(1).tolist()[1] == 7 and kept.sum(1).tolist()[6] == 1  # the top-ks kept as many
    assert torch.equal(tokens, (probs * expected / noise).argmax(dim=-1))


def test_ties_at_the_threshold_are_all_kept():
    probs = torch.tensor([[0.3, 0.2, 0.1, 0.2, 0.2], [0.4, 0.3, 0.1, 0.1, 0.1]])
    noise = torch.ones_like(probs)
    top_k, top_p, min_p = torch.tensor([2, 5]), torch.tensor([1.0, 0.75]), torch.zeros(2)
    _, thresholds = threshold_draw(*(t.to(DEVICE) for t in (probs, noise, top_k, top_p, min_p)))
    # top-k 2: the second-best value is shared by three tokens; top-p 0.75 crosses at a shared 0.1
    assert thresholds.cpu().tolist() == pytest.approx([0.2, 0.1])


def test_an_unfiltered_row_draws_its_argmax_over_noise_and_min_p_cuts_at_its_fraction():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.05, 0.5, 0.3, 0.15]])
    noise = torch.tensor([[0.01, 10.0, 10.0, 10.0], [0.01, 10.0, 10.0, 10.0]])
    top_k, top_p, min_p = torch.tensor([4, 4]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.2])
    tokens, thresholds = threshold_draw(*(t.to(DEVICE) for t in (probs, noise, top_k, top_p, min_p)))
    assert tokens.cpu().tolist() == [0, 1]  # token 0's tiny noise wins unless min-p (0.1 of 0.5) drops it
    assert thresholds.cpu().tolist() == pytest.approx([0.0, 0.1])
