"""Which decode batch sizes are captured in graphs: the ladder up to max_graph_batch_size, ending at the
first size that holds max_num_seqs (a batch pads up to the next captured size)."""
import pytest

from sageinfer.config import EngineConfig
from sageinfer.executor.graph_runner import graph_batch_sizes


def test_the_ladder_ends_at_the_first_size_that_holds_max_num_seqs():
    assert graph_batch_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 32]  # 17-20 sequences pad to 32, not eager
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 4]


def test_max_graph_batch_size_caps_the_ladder_and_extends_it_past_512():
    assert graph_batch_sizes(1024)[-1] == 512  # the default cap: larger batches run eagerly
    sizes = graph_batch_sizes(1024, 1024)
    assert sizes[-1] == 1024 and sizes[sizes.index(512) + 1:] == list(range(544, 1025, 32))
    assert graph_batch_sizes(600, 1024)[-1] == 608
    assert graph_batch_sizes(300, 64)[-1] == 64


def test_a_max_graph_batch_size_under_one_is_refused():
    with pytest.raises(ValueError, match="max_graph_batch_size"):
        EngineConfig(model="m", max_graph_batch_size=0)
