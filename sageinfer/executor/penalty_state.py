"""What penalties read of each request, kept on the device between steps: a [vocab] mask of its prompt's
tokens, set once, and [vocab] counts of its output tokens, grown by the tokens each step adds.

Built on the host every step instead, a batch of 256 rows with Qwen3's 151,936-token vocabulary took 151 ms
of host time a step (2-core CPU) and 194 MB of copies to the device, several times a decode step's device
time: serving a model whose generation config sets a repetition penalty ran at a fraction of its speed.
Here a step sends the (slot, token) pairs it adds, about one a request."""
from __future__ import annotations

import numpy as np
import torch


class PenaltyState:
    """Slots of [vocab] rows on the device, one a request with penalties while it keeps sampling; slot 0 stays
    empty for the batch's rows without penalties. A request absent from a batch with penalties gives its slot
    back (it is rebuilt from its tokens if it samples again, as after a preemption)."""

    def __init__(self, vocab_size: int, device: torch.device, to_device):
        self.vocab_size, self.device, self.to_device = vocab_size, device, to_device
        self._slots: dict[str, list[int]] = {}  # request id -> [slot, output tokens counted]
        self._free: list[int] = []
        self.release()

    @property
    def num_slots(self) -> int:
        return self._counts.shape[0]

    @property
    def num_requests(self) -> int:
        """Requests holding a slot."""
        return len(self._slots)

    def batch_rows(self, requests: list,
                   prev_token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, vocab] output-token counts (int32) and prompt-token masks (bool) of the batch's rows (zeros
        for rows without penalties). prev_token_ids: the previous step's samples, still on the device: a request
        whose newest token is one of them (async scheduling) has it counted from there."""
        present = {r.request_id for r in requests if r.sampling_params.uses_penalties}
        for gone in [rid for rid in self._slots if rid not in present]:
            self._free.append(self._slots.pop(gone)[0])
        self._reserve(len(present) + 1)
        index, cleared, prompt_rows, prompt_tokens, count_rows, count_tokens = [], [], [], [], [], []
        pending_slots, pending_rows = [], []  # newest tokens on the device: slot, row of prev_token_ids
        for r in requests:
            if not r.sampling_params.uses_penalties:
                index.append(0)
                continue
            entry = self._slots.get(r.request_id)
            output = r.output_token_ids
            if entry is None or len(output) < entry[1]:  # new here (or its tokens were cut back): from scratch
                entry = self._slots[r.request_id] = [entry[0] if entry else self._free.pop(), 0]
                cleared.append(entry[0])
                tokens = np.unique(np.asarray(r.prompt_token_ids, dtype=np.int64))
                prompt_rows.append(np.full(len(tokens), entry[0]))
                prompt_tokens.append(tokens)
            known = len(output) - r.num_pending_tokens  # the tail is still on the device (async scheduling)
            added = output[entry[1]:known]
            count_rows += [entry[0]] * len(added)
            count_tokens += added
            if r.num_pending_tokens == 1 and prev_token_ids is not None and entry[1] < len(output):
                # the previous step's sample at last_sampled_row: counted there
                pending_slots.append(entry[0])
                pending_rows.append(r.last_sampled_row)
                entry[1] = len(output)
            else:  # any others still on the device (more than one, or no samples handed over): once on the host
                entry[1] = max(entry[1], known)
            index.append(entry[0])
        if cleared:
            slots = self._on_device(cleared)
            self._counts[slots] = 0
            self._prompt[slots] = False
        if prompt_rows:
            rows, tokens = self._on_device(np.concatenate(prompt_rows)), self._on_device(np.concatenate(prompt_tokens))
            self._prompt[rows, tokens] = True
        if count_rows:
            rows, tokens = self._on_device(count_rows), self._on_device(count_tokens)
            self._counts.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
        if pending_slots:
            slots, rows = self._on_device(pending_slots), self._on_device(pending_rows)
            self._counts.index_put_((slots, prev_token_ids[rows]), torch.ones_like(slots, dtype=torch.int32),
                                    accumulate=True)
        index = self._on_device(index)
        return self._counts[index], self._prompt[index]

    def release(self) -> None:
        """Give every slot and the rows' memory back (after the memory profile's full batch)."""
        self._counts = torch.zeros(0, self.vocab_size, dtype=torch.int32, device=self.device)
        self._prompt = torch.zeros(0, self.vocab_size, dtype=torch.bool, device=self.device)
        self._slots.clear()
        self._free.clear()

    def _on_device(self, values) -> torch.Tensor:
        return self.to_device(np.asarray(values, dtype=np.int64), self.device)

    def _reserve(self, slots: int) -> None:
        """At least `slots` slots (slot 0 included), doubling: the rows kept, the new ones free."""
        have = self.num_slots
        if slots <= have:
            return
        grown = max(slots, 2 * have, 8)
        counts = torch.zeros(grown, self.vocab_size, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(grown, self.vocab_size, dtype=torch.bool, device=self.device)
        counts[:have], prompt[:have] = self._counts, self._prompt
        self._counts, self._prompt = counts, prompt
        self._free += range(max(have, 1), grown)
