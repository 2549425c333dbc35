"""How much of the devices' peak the engine uses, live: model FLOPs and bytes of each launched step
against the platform's peak rates, over a sliding window (the `sageinfer:mfu` and `sageinfer:mbu`
gauges). Estimates from the step's shapes, counted when a step is launched, not measured on the chip.

FLOPs: 2 per weight per token in the linear layers and the LM head rows sampled, plus causal
attention (QK and PV) over each sequence's context. Bytes: the weights once per step, plus the KV
cache each sequence reads and writes.
"""
from __future__ import annotations

import collections
import time

import numpy as np


class UtilizationMeter:
    def __init__(self, model_config, weight_bytes: int, kv_bytes_per_token: float, num_devices: int,
                 peak_flops: float | None, peak_bytes_per_second: float | None, window_seconds: float = 5.0):
        m = model_config
        attn_width = m.num_attention_heads * m.head_dim
        per_layer = (m.hidden_size * (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim
                     + attn_width * m.hidden_size + 3 * m.hidden_size * m.intermediate_size)
        self.linear_flops_per_token = 2.0 * per_layer * m.num_hidden_layers
        self.head_flops_per_row = 2.0 * m.hidden_size * m.vocab_size
        self.attention_flops_per_pair = 4.0 * m.num_hidden_layers * attn_width  # per (query, key) pair
        self.weight_bytes = weight_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.num_devices = num_devices
        self.peak_flops, self.peak_bytes = peak_flops, peak_bytes_per_second
        self.window = window_seconds
        self._steps: collections.deque = collections.deque()  # (time, flops, bytes, tokens)

    def record_step(self, query_lens: np.ndarray, seq_lens: np.ndarray, num_sampled: int) -> None:
        """A launched step from the runner's own arrays: each sequence's new tokens and its length
        after them; num_sampled rows of the LM head."""
        tokens = int(query_lens.sum())
        pairs = float((query_lens * (seq_lens - (query_lens - 1) / 2)).sum())  # causal: query i sees context + i keys
        kv_tokens = int(seq_lens.sum())
        flops = tokens * self.linear_flops_per_token + num_sampled * self.head_flops_per_row \
            + pairs * self.attention_flops_per_pair
        moved = self.weight_bytes + kv_tokens * self.kv_bytes_per_token
        now = time.monotonic()
        self._steps.append((now, flops, moved, tokens))
        while self._steps and now - self._steps[0][0] > self.window:
            self._steps.popleft()

    def gauges(self) -> dict:
        """mfu and mbu (shares of all devices' peak; absent where the platform knows no peak) and
        tokens_per_second_per_device, over the window."""
        now = time.monotonic()
        steps = [s for s in self._steps if now - s[0] <= self.window]
        if not steps:
            rates = (0.0, 0.0, 0.0)
        else:
            span = max(now - steps[0][0], 1e-3)
            rates = tuple(sum(s[i] for s in steps) / span for i in (1, 2, 3))
        out = {"tokens_per_second_per_device": rates[2] / self.num_devices}
        if self.peak_flops:
            out["mfu"] = rates[0] / (self.num_devices * self.peak_flops)
        if self.peak_bytes:
            out["mbu"] = rates[1] / (self.num_devices * self.peak_bytes)
        return out
