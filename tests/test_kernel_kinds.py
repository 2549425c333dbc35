"""benchmarks/kernel_kinds.py: a profile's kernels summed by kind."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from kernel_kinds import kernel_kind, seconds_by_kind  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "GEMM"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", "GEMM"),
    ("_gemv_words_kernel", "GEMM"),
    ("_int8_matmul_kernel", "GEMM"),
    ("_weight_only_kernel", "GEMM"),
    ("_int4_dequantize_kernel", "other"),
    ("_paged_attention_kernel", "attention"),
    ("_ws_prefill_kernel", "attention"),
    ("_merge_splits_kernel", "attention"),
    ("_rms_norm_kernel", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<f", "other"),
])
def test_each_kernel_has_its_kind(name, kind):
    assert kernel_kind(name) == kind


def test_seconds_add_up_by_kind_and_every_kind_is_listed():
    totals = seconds_by_kind({"nvjet_a": 2.0, "nvjet_b": 1.5, "_paged_attention_kernel": 3.0,
                              "_silu_and_mul_kernel": 0.25})
    assert totals == {"GEMM": 3.5, "attention": 3.0, "other": 0.25}
    assert seconds_by_kind({}) == {"GEMM": 0.0, "attention": 0.0, "other": 0.0}
