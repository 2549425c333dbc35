"""The utilisation gauges: model FLOPs and bytes of the launched steps over the devices' peak."""
from types import SimpleNamespace

import numpy as np

import pytest

from sageinfer.engine.utilization import UtilizationMeter

CFG = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=100)


def test_a_step_counts_linear_head_and_causal_attention_flops_and_weight_and_kv_bytes(monkeypatch):
    clock = iter([100.0, 101.0])
    monkeypatch.setattr("sageinfer.engine.utilization.time.monotonic", lambda: next(clock))
    meter = UtilizationMeter(CFG, weight_bytes=1000, kv_bytes_per_token=10, num_devices=2, peak_flops=1e9,
                             peak_bytes_per_second=1e6)
    # a prefill chunk of 4 new tokens after 6 computed (not the last chunk) and one decode token at 9
    meter.record_step(np.array([4, 1]), np.array([6 + 4, 9 + 1]), num_sampled=1)
    per_layer = 64 * (4 + 4) * 16 + 64 * 64 + 3 * 64 * 128
    linear = 2 * per_layer * 2 * 5
    head = 2 * 64 * 100 * 1                           # only the decode request samples
    attention = 4 * 2 * 64 * (4 * (6 + 2.5) + 1 * (9 + 1))
    gauges = meter.gauges()                          # one second after the step
    assert gauges["mfu"] == pytest.approx((linear + head + attention) / (2 * 1e9))
    assert gauges["mbu"] == pytest.approx((1000 + (10 + 10) * 10) / (2 * 1e6))
    assert gauges["tokens_per_second_per_device"] == pytest.approx(5 / 2)


def test_no_peak_no_share_and_old_steps_leave_the_window(monkeypatch):
    times = iter([0.0, 0.5, 10.0])
    monkeypatch.setattr("sageinfer.engine.utilization.time.monotonic", lambda: next(times))
    meter = UtilizationMeter(CFG, 1000, 10, 1, None, None, window_seconds=5.0)
    meter.record_step(np.array([3]), np.array([3]), num_sampled=1)
    assert set(meter.gauges()) == {"tokens_per_second_per_device"}
    assert meter.gauges()["tokens_per_second_per_device"] == 0.0
