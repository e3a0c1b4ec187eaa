"""Per-rank loads (`cp_attn.layout.balance`), checked against a plain-Python count over the rows of
tests/test_layout.py's reference layout (DESIGN.md section 3) and against closed forms."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_attn.layout import (
    contiguous_loads,
    gather_padding,
    imbalance,
    plan_split,
    rank_loads,
    relative,
    rows_by_sequence,
)
from tests.test_layout import ref_rows, ref_tokens

SETTINGS = settings(max_examples=100, deadline=None)
batches = st.lists(st.integers(1, 40), min_size=1, max_size=6)


def ref_load(seq_lens: list[int], tokens: list[int], K: int) -> tuple[int, int, int, int]:
    """(real rows, padding rows, sum of p + 1, sum of min(K, p + 1)) over the given global tokens."""
    info = ref_tokens(seq_lens)
    pos = [info[t][1] for t in tokens if t >= 0]
    return len(pos), sum(t < 0 for t in tokens), sum(p + 1 for p in pos), sum(min(K, p + 1) for p in pos)


@SETTINGS
@given(seq_lens=batches, C=st.integers(1, 8), mode=st.sampled_from(["in_seq", "round_robin"]), K=st.integers(1, 50))
def test_rank_loads_count_the_rows_of_each_rank(seq_lens, C, mode, K):
    loads = rank_loads(plan_split(seq_lens, C, mode), K)
    want = [ref_load(seq_lens, rows, K) for rows in ref_rows(seq_lens, C, mode)]
    assert [(x.rows, x.pad_rows, x.indexer_keys, x.attended_keys) for x in loads] == want


@SETTINGS
@given(seq_lens=batches, C=st.integers(1, 8), K=st.integers(1, 50))
def test_contiguous_loads_take_equal_runs_of_the_batch(seq_lens, C, K):
    T = sum(seq_lens)
    S = -(-T // C)
    want = [ref_load(seq_lens, list(range(r * S, min((r + 1) * S, T))), K) for r in range(C)]
    got = contiguous_loads(seq_lens, C, K)
    assert [(x.rows, x.pad_rows, x.indexer_keys, x.attended_keys) for x in got] == want


@pytest.mark.parametrize("C", [1, 2, 3, 4, 8], ids=lambda c: f"C{c}")
def test_in_seq_balances_the_indexer_of_one_sequence_exactly(C):
    """L a multiple of 2C: rank r holds blocks r and 2C-1-r of m tokens, causal work m(2C m + 1) each."""
    m = 5
    loads = rank_loads(plan_split([2 * C * m], C, "in_seq"), topk=10**9)
    assert [x.indexer_keys for x in loads] == [m * (2 * C * m + 1)] * C
    assert imbalance([x.indexer_keys for x in loads]) == 1.0
    contiguous = [x.indexer_keys for x in contiguous_loads([2 * C * m], C, topk=10**9)]
    assert C == 1 or imbalance(contiguous) > 1.5 - 1 / C  # the last run holds the most causal keys


def test_in_seq_unbalances_capped_attention_of_one_long_sequence():
    """With K well below L, in_seq's first rank (blocks 0 and 2C-1) reads fewer keys than its middle ranks."""
    loads = rank_loads(plan_split([8192], 4, "in_seq"), topk=2048)
    attended = [x.attended_keys for x in loads]
    assert attended[0] < attended[-1]
    assert imbalance(attended) == pytest.approx(4 * (2048 * 2048) / sum(attended))  # rank 3: 2048 rows of K keys
    assert imbalance([x.attended_keys for x in rank_loads(plan_split([8192], 4, "round_robin"), 2048)]) < 1.001


@pytest.mark.parametrize(
    "seq_lens,C,mode,want",
    [([3], 4, "round_robin", [[1], [1], [1], [0]]),
     ([3], 4, "in_seq", [[1], [1], [1], [0]]),
     ([4, 2], 2, "in_seq", [[2, 1], [2, 1]]),
     ([5, 1], 2, "round_robin", [[3, 0], [2, 1]])],
    ids=["rr-short", "inseq-short", "inseq-two", "rr-two"],
)
def test_rows_by_sequence(seq_lens, C, mode, want):
    assert rows_by_sequence(plan_split(seq_lens, C, mode)) == want


@SETTINGS
@given(seq_lens=batches, C=st.integers(1, 8), mode=st.sampled_from(["in_seq", "round_robin"]))
def test_gather_padding_is_what_pads_every_rank_to_the_largest(seq_lens, C, mode):
    rows = ref_rows(seq_lens, C, mode)
    real = [sum(t >= 0 for t in r) for r in rows]
    assert gather_padding(plan_split(seq_lens, C, mode)) == C * max(len(r) for r in rows) - sum(real)
    if mode == "round_robin":
        assert gather_padding(plan_split(seq_lens, C, mode)) == -sum(seq_lens) % C


def test_relative_and_imbalance():
    assert relative([1, 3]) == [0.5, 1.5]
    assert imbalance([1, 3]) == 1.5
    assert imbalance([0, 0]) == 1.0 and relative([0, 0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="no ranks"):
        imbalance([])
    with pytest.raises(ValueError, match="no ranks"):
        relative([])


@pytest.mark.parametrize("bad", [0, -1, True, 2.0], ids=["zero", "negative", "bool", "float"])
def test_bad_topk_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        rank_loads(plan_split([4], 2, "in_seq"), bad)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        contiguous_loads([4], 2, bad)


def test_contiguous_loads_reject_a_bad_cp_size():
    with pytest.raises(ValueError, match="cp_size must be an int >= 1"):
        contiguous_loads([4], 0, 2)
