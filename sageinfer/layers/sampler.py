"""Batched sampling on the device.

Order, as in vLLM: penalties -> temperature -> top-k / top-p / min-p -> draw. A draw is
argmax(probs / Exp(1) noise), which equals sampling from probs; each seeded request draws its noise
from its own generator, so its tokens do not depend on the batch it runs in.
Logprobs are of the raw model distribution (before penalties and temperature).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Rows sampled at once: a batch that needs [rows, vocab] buffers (a draw, penalties, masks, logprobs) is
# sampled this many rows at a time, so those buffers stay a fraction of the whole batch's. With every option
# on, 1,024 rows of Qwen3's 151,936-token vocabulary took 5.0 GB at once (measured on a CPU); the memory
# profile samples such a batch (ModelRunner._costliest_sampling). Rows are independent: the tokens are the
# same, the unseeded rows' noise aside (drawn in another order from the same generator).
SAMPLE_CHUNK_ROWS = 256
# Per-row fields of a SamplingBatch (the first dimension is the row).
_ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "output_token_counts", "prompt_token_mask", "allowed_mask", "grammar_bitmask")


@dataclass
class SamplingBatch:
    temperature: torch.Tensor          # [B] float32, 0 for greedy rows
    top_k: torch.Tensor                # [B] int64, vocab size when disabled
    top_p: torch.Tensor                # [B] float32
    min_p: torch.Tensor                # [B] float32
    generators: list                   # [B] torch.Generator or None
    all_greedy: bool
    needs_filter: bool                 # any row with top-k, top-p or min-p
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
        part = dataclasses.replace(self, generators=self.generators[start:stop], **{
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


def filter_probs(probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k / top-p / min-p set (not renormalised)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
    keep = ranks < b.top_k.unsqueeze(1)
    sorted_probs = sorted_probs * keep
    # top-p over the top-k survivors, renormalised, keeping the token that crosses the threshold.
    mass = sorted_probs.sum(dim=-1, keepdim=True)
    cum_before = (sorted_probs.cumsum(dim=-1) - sorted_probs) / mass
    keep &= cum_before < b.top_p.unsqueeze(1)
    keep &= sorted_probs >= b.min_p.unsqueeze(1) * sorted_probs[:, :1]
    keep[:, 0] = True
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] packed int32 -> [B, vocab_size] bool (bit j of word w is token 32 w + j)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


class Sampler:
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
        greedy_tokens = logits.argmax(dim=-1)
        if b.all_greedy:
            tokens = greedy_tokens
        else:
            temperature = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
            probs = (logits / temperature.unsqueeze(1)).softmax(dim=-1)
            if b.needs_filter:
                probs = filter_probs(probs, b)
            noise = self._exponential_noise(probs, b.generators)
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(b.temperature > 0, sampled, greedy_tokens)
        out = SamplerOutput(token_ids=tokens)
        if b.max_num_logprobs >= 0:
            self._add_logprobs(out, raw_logits, tokens, b.max_num_logprobs)
        return out

    @staticmethod
    def _exponential_noise(probs: torch.Tensor, generators: list) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(generators):
            if gen is not None:
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
