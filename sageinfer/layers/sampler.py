"""Batched sampling on the device.

Order, as in vLLM: penalties -> temperature -> top-k / top-p / min-p -> draw. A draw is
argmax(probs / Exp(1) noise), which equals sampling from probs; each seeded request draws its noise
from its own generator, so its tokens do not depend on the batch it runs in.
When every drawing row has a top-k of at most TOP_K_DRAW_MAX, the batch draws among its rows' k best
tokens only: one top-k of the logits in place of a softmax, a sort and noise over the whole vocabulary.
Min-p alone is a threshold on each row's probabilities: it sorts nothing either. Where the platform runs
Triton kernels, top-p and larger top-ks are thresholds too (ops/sampling_thresholds.py searches each row's
threshold and draws in one kernel); elsewhere the vocabulary is sorted.
Logprobs are of the raw model distribution (before penalties and temperature).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

# Rows sampled at once: a batch that needs [rows, vocab] buffers (a draw, penalties, masks, logprobs) is
# sampled this many rows at a time, so those buffers stay a fraction of the whole batch's. With every option
# on, 1,024 rows of Qwen3's 151,936-token vocabulary took 5.0 GB at once (measured on a CPU); the memory
# profile samples such a batch (ModelRunner._costliest_sampling). Rows are independent: the tokens are the
# same, the unseeded rows' noise aside (drawn in another order from the same generator).
SAMPLE_CHUNK_ROWS = 256
# Rows with a top-k of at most this many tokens draw among them alone (Qwen3's generation config asks 20):
# a batch whose drawing rows all have one takes the top-k of its logits instead of sorting the vocabulary.
# A seeded row of such a top-k draws its k noise values in rank order on either path (so its tokens do not
# depend on which path its batch took); other drawing seeded rows draw one per token, in token order.
TOP_K_DRAW_MAX = 1024
# Rows from which a batch drawn over the whole vocabulary takes the threshold kernel, where the platform runs it:
# it searches a row in one program, so a few rows leave most of the device idle and a sort is quicker (on an H200,
# top-p over Qwen3's vocabulary: 0.67 ms sorted against about 0.72 at 16 rows, 1.45 against 0.79 at 64).
# SAGEINFER_THRESHOLD_KERNEL_MIN_ROWS.
THRESHOLD_KERNEL_MIN_ROWS = int(os.environ.get("SAGEINFER_THRESHOLD_KERNEL_MIN_ROWS", "32"))
# Per-row fields of a SamplingBatch (the first dimension is the row; the host's lists among them).
_ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "output_token_counts", "prompt_token_mask", "allowed_mask", "grammar_bitmask",
               "generators", "top_k_host")


@dataclass
class SamplingBatch:
    temperature: torch.Tensor          # [B] float32, 0 for greedy rows
    top_k: torch.Tensor                # [B] int64, vocab size when disabled
    top_p: torch.Tensor                # [B] float32
    min_p: torch.Tensor                # [B] float32
    generators: list                   # [B] torch.Generator or None
    all_greedy: bool
    needs_filter: bool                 # any row with top-k, top-p or min-p
    needs_sort: bool = True            # any drawing row with top-k or top-p (min-p alone is a threshold)
    # [B] each drawing row's top_k as an int, 0 for greedy rows (None: not known, the vocabulary is sorted)
    top_k_host: list | None = None
    # Penalties (None when no row uses them)
    presence_penalty: torch.Tensor | None = None     # [B]
    frequency_penalty: torch.Tensor | None = None    # [B]
    repetition_penalty: torch.Tensor | None = None   # [B]
    output_token_counts: torch.Tensor | None = None  # [B, V] counts of generated tokens (int32)
    prompt_token_mask: torch.Tensor | None = None    # [B, V] bool
    # Rows under min_tokens: token ids to ban this step, as (row, token) index pairs
    banned_rows: torch.Tensor | None = None
    banned_tokens: torch.Tensor | None = None
    # added to the pairs' logits (-inf, or 0 for another chunk's pairs); None: -inf added to each pair's logit
    banned_values: torch.Tensor | None = None
    # logit_bias as (row, token, bias) triples; allowed_token_ids as a [B, V] mask (True: may be sampled)
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    allowed_mask: torch.Tensor | None = None
    # Structured output: [B, ceil(V / 32)] int32, bit t of a row set where token t may be drawn
    # (all bits set in rows without a grammar)
    grammar_bitmask: torch.Tensor | None = None
    max_num_logprobs: int = -1         # -1: no row wants logprobs

    def needs_vocab_buffers(self) -> bool:
        """Whether sampling makes [rows, vocab] tensors (all but a plain greedy batch's argmax do)."""
        return not self.all_greedy or self.max_num_logprobs >= 0 or any(
            getattr(self, name) is not None for name in ("presence_penalty", "banned_rows", "bias_rows",
                                                          "allowed_mask", "grammar_bitmask"))

    def rows(self, start: int, stop: int) -> "SamplingBatch":
        """The batch of rows start..stop-1 (the batch-wide flags kept: a row they do not concern is
        sampled as it would be alone)."""
        part = dataclasses.replace(self, **{
            name: getattr(self, name)[start:stop] for name in _ROW_FIELDS if getattr(self, name) is not None})
        # (row, token) pairs: every pair stays, another chunk's moved into this one's rows and made to add 0
        # (selecting this chunk's pairs on the device would wait for it).
        last = len(part.generators) - 1
        if self.banned_rows is not None:
            inside = (self.banned_rows >= start) & (self.banned_rows < stop)
            banned = self.banned_values if self.banned_values is not None else torch.full(
                self.banned_rows.shape, float("-inf"), device=self.banned_rows.device)
            part.banned_rows = (self.banned_rows - start).clamp(0, last)
            part.banned_values = torch.where(inside, banned, torch.zeros_like(banned))
        if self.bias_rows is not None:
            inside = (self.bias_rows >= start) & (self.bias_rows < stop)
            part.bias_rows = (self.bias_rows - start).clamp(0, last)
            part.bias_values = torch.where(inside, self.bias_values, torch.zeros_like(self.bias_values))
        return part

    def seeded_draw(self, row: int) -> int | None:
        """How a seeded row draws its noise: None, over the vocabulary in token order; k > 0, k values in rank
        order (a drawing row whose top-k is at most TOP_K_DRAW_MAX); 0, not at all (a greedy row)."""
        k = self.top_k_host[row] if self.top_k_host is not None else None
        return k if k is not None and k <= TOP_K_DRAW_MAX else None

    def top_k_draw(self) -> int:
        """The tokens a batch may draw among (the largest top-k of its drawing rows), or 0 when some drawing
        row's top-k is over TOP_K_DRAW_MAX (or unknown): the batch then sorts the vocabulary."""
        largest = max(self.top_k_host, default=0) if self.top_k_host is not None else 0
        return largest if largest <= TOP_K_DRAW_MAX else 0


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                   # [B] int64
    logprobs: torch.Tensor | None = None      # [B, 1 + k]: sampled token first, then the top k
    logprob_token_ids: torch.Tensor | None = None  # [B, 1 + k]
    sampled_ranks: torch.Tensor | None = None  # [B] rank of the sampled token (1 = most likely)
    host_copy: object = None  # (host tensors, handle) of an async copy started by the runner

    def to_lists(self) -> tuple[list, list | None, list | None, list | None]:
        """token ids, logprobs, logprob token ids, ranks as Python lists (waits for the copy)."""
        host, handle = self.host_copy
        handle.synchronize()
        lists = [t.tolist() for t in host]
        if len(lists) == 1:
            return lists[0], None, None, None
        return tuple(lists)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    counts = b.output_token_counts
    seen = (counts > 0) | b.prompt_token_mask
    rep = b.repetition_penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - b.frequency_penalty.unsqueeze(1) * counts
    logits = logits - b.presence_penalty.unsqueeze(1) * (counts > 0).float()
    return logits


def filter_sorted(sorted_probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Zero each row's probabilities (sorted, descending; the row's best tokens or all of them) outside its
    top-k / top-p / min-p set (not renormalised)."""
    ranks = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device).unsqueeze(0)
    keep = ranks < b.top_k.unsqueeze(1)
    sorted_probs = sorted_probs * keep
    # top-p over the top-k survivors, renormalised, keeping the token that crosses the threshold.
    mass = sorted_probs.sum(dim=-1, keepdim=True)
    cum_before = (sorted_probs.cumsum(dim=-1) - sorted_probs) / mass
    keep &= cum_before < b.top_p.unsqueeze(1)
    keep &= sorted_probs >= b.min_p.unsqueeze(1) * sorted_probs[:, :1]
    keep[:, 0] = True
    return sorted_probs * keep


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] packed int32 -> [B, vocab_size] bool (bit j of word w is token 32 w + j)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


class Sampler:
    def __init__(self, threshold_kernel: bool = False):
        # The platform's kernel choice (the model runner's): a batch drawn over the whole vocabulary keeps each
        # row's tokens at or above a threshold that a Triton kernel searches, instead of sorting the vocabulary.
        self.threshold_kernel = threshold_kernel

    def threshold_kernel_min_rows(self) -> int | None:
        """The fewest rows with which a batch drawn over the whole vocabulary takes the threshold kernel (None:
        it never does)."""
        return max(THRESHOLD_KERNEL_MIN_ROWS, 1) if self.threshold_kernel else None

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        num_rows = logits.shape[0]
        if num_rows <= SAMPLE_CHUNK_ROWS or not b.needs_vocab_buffers():
            return self._sample(logits, b)
        parts = [self._sample(logits[start:start + SAMPLE_CHUNK_ROWS], b.rows(start, start + SAMPLE_CHUNK_ROWS))
                 for start in range(0, num_rows, SAMPLE_CHUNK_ROWS)]
        names = [f.name for f in dataclasses.fields(SamplerOutput)
                 if f.name != "host_copy" and getattr(parts[0], f.name) is not None]
        return SamplerOutput(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names})

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        raw_logits = logits
        if b.presence_penalty is not None:
            logits = apply_penalties(logits, b)
        if b.banned_rows is not None:  # -inf added (finite logits: as set), another chunk's pairs adding 0
            banned = b.banned_values if b.banned_values is not None else torch.full((), float("-inf"),
                                                                                    device=logits.device)
            logits = logits.index_put((b.banned_rows, b.banned_tokens), banned, accumulate=True)
        if b.bias_rows is not None:
            logits = logits.index_put((b.bias_rows, b.bias_tokens), b.bias_values, accumulate=True)
        if b.allowed_mask is not None:
            logits = logits.masked_fill(~b.allowed_mask, float("-inf"))
        if b.grammar_bitmask is not None:
            logits = logits.masked_fill(~unpack_bitmask(b.grammar_bitmask, logits.shape[-1]), float("-inf"))
        if b.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            temperature = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature)).unsqueeze(1)
            k = b.top_k_draw()
            sampled = self._draw_among_top_k(logits, temperature, b, k) if k else self._draw(logits, temperature, b)
            all_draw = b.top_k_host is not None and 0 not in b.top_k_host  # no greedy row: no argmax to take
            tokens = sampled if all_draw else torch.where(b.temperature > 0, sampled, logits.argmax(dim=-1))
        out = SamplerOutput(token_ids=tokens)
        if b.max_num_logprobs >= 0:
            self._add_logprobs(out, raw_logits, tokens, b.max_num_logprobs)
        return out

    def _draw_among_top_k(self, logits: torch.Tensor, temperature: torch.Tensor, b: SamplingBatch,
                          k: int) -> torch.Tensor:
        """Each row drawn among its batch's k best tokens (k: every drawing row's top-k or more); the
        softmax over those k is the top-k survivors' distribution, which top-p and min-p read."""
        values, token_ids = logits.topk(k, dim=-1)  # sorted, best first
        probs = filter_sorted((values / temperature).softmax(dim=-1), b)
        ranks = (probs / self._noise(probs, b, ranked=True)).argmax(dim=-1, keepdim=True)
        return token_ids.gather(1, ranks).squeeze(1)

    def _draw(self, logits: torch.Tensor, temperature: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """Each row drawn over the whole vocabulary: its kept tokens found by a threshold kernel, or by sorting
        the vocabulary when some row has a top-k or top-p."""
        probs = (logits / temperature).softmax(dim=-1)
        min_rows = self.threshold_kernel_min_rows()
        if min_rows is not None and probs.shape[0] >= min_rows:
            from sageinfer.ops.sampling_thresholds import threshold_draw
            return threshold_draw(probs, self._noise(probs, b, ranked=False), b.top_k, b.top_p, b.min_p)[0]
        if not b.needs_sort:  # min-p alone: a fraction of each row's top probability, no order needed
            if b.needs_filter:
                probs = probs * (probs >= b.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True))
            return (probs / self._noise(probs, b, ranked=False)).argmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        noise = self._noise(sorted_probs, b, ranked=True, order=order)
        ranks = (filter_sorted(sorted_probs, b) / noise).argmax(dim=-1, keepdim=True)
        return order.gather(1, ranks).squeeze(1)

    @staticmethod
    def _noise(probs: torch.Tensor, b: SamplingBatch, ranked: bool, order: torch.Tensor | None = None):
        """Exp(1) noise over probs' columns (ranks when `ranked`, else tokens), seeded rows' from their own
        generators as SamplingBatch.seeded_draw says: token-order values are moved to rank order through
        `order` (a sorted vocabulary's); in token order, a row that draws k values in rank order puts them on its
        k most likely tokens, and infinite noise (a score of 0, never drawn) on the others."""
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(b.generators):
            k = b.seeded_draw(row) if gen is not None else 0
            if k and ranked:
                noise[row, :k].exponential_(generator=gen)
            elif k:
                noise[row] = float("inf")
                noise[row, probs[row].topk(k).indices] = torch.empty(k, device=probs.device).exponential_(
                    generator=gen)
            elif k is None and ranked:
                noise[row] = torch.empty_like(noise[row]).exponential_(generator=gen)[order[row]]
            elif k is None:
                noise[row].exponential_(generator=gen)
        return noise

    @staticmethod
    def _add_logprobs(out: SamplerOutput, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> None:
        logprobs = logits.float().log_softmax(dim=-1)
        sampled_lp = logprobs.gather(1, tokens.unsqueeze(1))
        out.sampled_ranks = (logprobs > sampled_lp).sum(dim=-1) + 1
        if k > 0:
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            out.logprobs = torch.cat([sampled_lp, top_lp], dim=1)
            out.logprob_token_ids = torch.cat([tokens.unsqueeze(1), top_ids], dim=1)
        else:
            out.logprobs, out.logprob_token_ids = sampled_lp, tokens.unsqueeze(1)
