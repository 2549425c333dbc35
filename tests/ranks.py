"""Tensor parallelism needs a GPU per rank where there are GPUs (on the CPU, ranks are processes)."""
import pytest
import torch


def skip_unless_ranks(n: int) -> None:
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        pytest.skip(f"tensor_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible")


def needs_ranks(n: int):
    """The same as a mark, for whole tests."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else None
    return pytest.mark.skipif(visible is not None and visible < n,
                              reason=f"tensor_parallel_size {n} needs {n} GPUs; {visible} visible")
