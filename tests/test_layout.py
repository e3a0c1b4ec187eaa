"""Token layouts of `plan_split`, every rank of every plan checked in one process.

Reference: a plain-Python reimplementation of DESIGN.md section 3 written here (`ref_*` below); no
library helper is used to build an expectation. Batches (B sequences, lengths L_b, T tokens) and CP
sizes C come from hypothesis plus hand-picked edge cases (length 1, sequences shorter than C, T < C).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cp_attn.layout import plan_split

MODES = ["round_robin", "interleave", "in_seq", "zigzag"]  # canonical names and their aliases
CANONICAL = {"round_robin": "round_robin", "interleave": "round_robin", "in_seq": "in_seq", "zigzag": "in_seq"}
SETTINGS = settings(max_examples=150, deadline=None)

batches = st.lists(st.integers(1, 40), min_size=1, max_size=6)
cp_sizes = st.integers(1, 8)
modes = st.sampled_from(MODES)


# ---- plain-Python reference -----------------------------------------------------------------------


def ref_block_sizes(L: int, C: int) -> list[int]:
    """The 2C in-seq blocks of one sequence: L // 2C each, one more for the first L % 2C."""
    return [L // (2 * C) + (1 if i < L % (2 * C) else 0) for i in range(2 * C)]


def ref_rows(seq_lens: list[int], C: int, mode: str) -> list[list[int]]:
    """rows[r][i] = global token of row i of rank r, -1 for a padding row."""
    T = sum(seq_lens)
    if CANONICAL[mode] == "round_robin":
        S = (T + C - 1) // C
        return [[r + i * C if r + i * C < T else -1 for i in range(S)] for r in range(C)]
    rows: list[list[int]] = [[] for _ in range(C)]
    start = 0
    for L in seq_lens:
        block_start = [start]
        for size in ref_block_sizes(L, C):
            block_start.append(block_start[-1] + size)
        for r in range(C):
            for blk in (r, 2 * C - 1 - r):  # early block first, then its late partner
                rows[r].extend(range(block_start[blk], block_start[blk + 1]))
        start += L
    return rows


def ref_tokens(seq_lens: list[int]) -> list[tuple[int, int, int]]:
    """Per global token: (sequence id, position in its sequence, start of its sequence)."""
    out, start = [], 0
    for b, L in enumerate(seq_lens):
        out.extend((b, p, start) for p in range(L))
        start += L
    return out


def edge_cases(test):
    """Hand-picked batches every hypothesis test also runs: T < C, length 1, all lengths < C, L % 2C == 0."""
    for seq_lens, C, mode in [
        ([1], 1, "round_robin"),
        ([1], 8, "round_robin"),
        ([1], 8, "in_seq"),
        ([1, 1, 1], 4, "zigzag"),
        ([3, 1, 2], 4, "interleave"),
        ([2, 40, 1, 7], 8, "in_seq"),
        ([16, 32], 8, "zigzag"),
        ([40] * 6, 8, "round_robin"),
        ([40] * 6, 7, "in_seq"),
    ]:
        test = example(seq_lens=seq_lens, C=C, mode=mode)(test)
    return test


# ---- rows of every rank ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_lens, C, mode, expected",
    [
        pytest.param([10], 2, "in_seq", [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]], id="in_seq-L10-C2"),
        pytest.param([3, 4], 2, "zigzag", [[0, 3, 6], [1, 2, 4, 5]], id="zigzag-L3,4-C2"),
        pytest.param([2], 3, "in_seq", [[0], [1], []], id="in_seq-L2-C3-empty-rank"),
        pytest.param([3, 4], 3, "round_robin", [[0, 3, 6], [1, 4, -1], [2, 5, -1]], id="round_robin-L3,4-C3"),
        pytest.param([1], 4, "interleave", [[0], [-1], [-1], [-1]], id="interleave-L1-C4"),
    ],
)
def test_worked_examples(seq_lens, C, mode, expected):
    plan = plan_split(seq_lens, C, mode)
    assert [plan.token_index(r).tolist() for r in range(C)] == expected


@SETTINGS
@given(seq_lens=batches, C=cp_sizes, mode=modes)
@edge_cases
def test_rows_follow_the_rule(seq_lens, C, mode):
    plan = plan_split(seq_lens, C, mode)
    expected = ref_rows(seq_lens, C, mode)
    T = sum(seq_lens)
    assert (plan.mode, plan.cp_size, plan.seq_lens, plan.num_tokens) == (CANONICAL[mode], C, tuple(seq_lens), T)
    assert plan.cu_seqlens.tolist() == [sum(seq_lens[:b]) for b in range(len(seq_lens) + 1)]
    for r in range(C):
        tok = plan.token_index(r)
        assert tok.dtype == torch.long and tok.dim() == 1
        assert tok.tolist() == expected[r], f"rank {r}"
        assert plan.num_rows(r) == len(expected[r])
    if CANONICAL[mode] == "round_robin":
        assert plan.shard_size == math.ceil(T / C)
        assert all(plan.num_rows(r) == plan.shard_size for r in range(C)), "round-robin shards must be equal"
    else:
        assert plan.shard_size == max(len(rows) for rows in expected)
        assert all(-1 not in rows for rows in expected)  # in-seq never pads (reference sanity)


@SETTINGS
@given(seq_lens=batches, C=cp_sizes, mode=modes)
@edge_cases
def test_every_token_exactly_once(seq_lens, C, mode):
    plan = plan_split(seq_lens, C, mode)
    real = [t for r in range(C) for t in plan.token_index(r).tolist() if t != -1]
    assert sorted(real) == list(range(sum(seq_lens)))
    assert all(t >= -1 for r in range(C) for t in plan.token_index(r).tolist())


@pytest.mark.parametrize("C", [1, 3], ids=lambda C: f"C{C}")
@pytest.mark.parametrize("rank", ["-1", "C"], ids=lambda r: f"rank={r}")
def test_rank_outside_group_is_rejected(C, rank):
    plan = plan_split([5], C, "in_seq")
    bad = -1 if rank == "-1" else C
    for method in (plan.token_index, plan.num_rows, plan.positions, plan.seq_ids, plan.key_range):
        with pytest.raises(ValueError, match=rf"rank {bad}\b"):
            method(bad)


def test_token_index_is_a_copy():
    plan = plan_split([6], 2, "in_seq")
    plan.token_index(0)[:] = 99
    assert plan.token_index(0).tolist() == [0, 1, 5]


# ---- per-row metadata -----------------------------------------------------------------------------


@SETTINGS
@given(seq_lens=batches, C=cp_sizes, mode=modes)
@edge_cases
def test_positions_and_seq_ids(seq_lens, C, mode):
    plan = plan_split(seq_lens, C, mode)
    info = ref_tokens(seq_lens)
    for r, rows in enumerate(ref_rows(seq_lens, C, mode)):
        exp_seq = [info[t][0] if t >= 0 else -1 for t in rows]
        exp_pos = [info[t][1] if t >= 0 else 0 for t in rows]
        assert plan.seq_ids(r).tolist() == exp_seq, f"rank {r}"
        assert plan.positions(r).tolist() == exp_pos, f"rank {r}"


@SETTINGS
@given(seq_lens=batches, C=cp_sizes, mode=modes)
@edge_cases
def test_key_range(seq_lens, C, mode):
    """ks = start of the row's sequence, ke = token + 1 (= ks + position + 1); padding rows get ks == ke."""
    plan = plan_split(seq_lens, C, mode)
    info = ref_tokens(seq_lens)
    for r, rows in enumerate(ref_rows(seq_lens, C, mode)):
        ks, ke = plan.key_range(r)
        assert ks.shape == ke.shape == (len(rows),)
        for i, t in enumerate(rows):
            if t >= 0:
                assert (ks[i].item(), ke[i].item()) == (info[t][2], t + 1), f"rank {r} row {i} (token {t})"
                assert ke[i].item() == info[t][2] + info[t][1] + 1
            else:
                assert ks[i].item() == ke[i].item(), f"rank {r} row {i} is padding but has keys [{ks[i]}, {ke[i]})"


@SETTINGS
@given(seq_lens=batches, C=cp_sizes, mode=modes)
@edge_cases
def test_causal_work_is_sum_of_positions(seq_lens, C, mode):
    plan = plan_split(seq_lens, C, mode)
    info = ref_tokens(seq_lens)
    expected = [sum(info[t][1] + 1 for t in rows if t >= 0) for rows in ref_rows(seq_lens, C, mode)]
    assert plan.causal_work() == expected


# ---- gather buffer and its inverse ----------------------------------------------------------------


@SETTINGS
@given(seq_lens=batches, C=cp_sizes, mode=modes)
@edge_cases
def test_restore_index_inverts_the_gather(seq_lens, C, mode):
    """x[perm][restore] == x: shards (pad rows left NaN) laid out rank-major, then restore_index."""
    plan = plan_split(seq_lens, C, mode)
    rows = ref_rows(seq_lens, C, mode)
    T, S = sum(seq_lens), max(len(r) for r in rows)
    assert plan.shard_size == S

    perm = [t for r in range(C) for t in rows[r] + [-1] * (S - len(rows[r]))]  # [C * S], -1 = pad
    assert plan.gathered_token_index.tolist() == perm
    assert plan.restore_index.tolist() == [perm.index(t) for t in range(T)]

    x = torch.arange(T * 3, dtype=torch.float64).view(T, 3)
    gathered = torch.full((C * S, 3), float("nan"), dtype=torch.float64)
    for r in range(C):
        tok = plan.token_index(r)
        shard = torch.full((len(tok), 3), float("nan"), dtype=torch.float64)  # [n_r, 3], pad rows stay NaN
        shard[tok >= 0] = x[tok[tok >= 0]]
        gathered[r * S : r * S + len(tok)] = shard
    restored = gathered[plan.restore_index]
    assert not restored.isnan().any(), "restore_index picks a padding row"
    assert torch.equal(restored, x)


# ---- causal-work balance on one long sequence -----------------------------------------------------
#
# One sequence of length L on C ranks; the work of a row at position p is p + 1, W_r = sum over rank r.
#
# in-seq: 2C blocks, b = L // 2C, q = L % 2C; block i has s_i = b + [i < q] tokens and starts at
# o_i = i b + min(i, q), so its work is s_i o_i + s_i (s_i + 1) / 2 = b^2 i + b(b+1)/2 + V(i) with
#     V(i) = (2b+1) i + b + 1   for i < q,        V(i) = b q   for i >= q.
# Rank r owns blocks r and j = 2C-1-r; the b^2 (r + j) + b(b+1) part is the same on every rank, so the
# spread max_r W_r - min_r W_r is the spread of V(r) + V(j). Splitting on where q falls (r < C <= j):
#     q = 0:          0                                   (perfectly balanced)
#     q = 1:          1                                   (rank 0's block 0 has the one extra token)
#     2 <= q <= C:    (q - 1)(2b + 1)
#     C < q < 2C:     (2C - 1)(2b + 1) + b + 1 - b q      (late blocks of ranks > 2C-1-q also grow)
# (for b >= 1, i.e. L >= 2C). The last case is the largest and falls with q, so over all q the tight
# bound is at q = C + 1:  spread <= C (3b + 2) - 2b  <  1.5 L + 2C.
# Note this is NOT "one block's work" b(b+1): with L = 70, C = 8 (b = 4, q = 6) the spread is 45 > 20.
#
# round-robin: rank r holds tokens r, r + C, ...; with m = L // C, q' = L % C, ranks r < q' hold m + 1
# tokens, W_r = k_r (r + 1) + C k_r (k_r - 1) / 2. The largest W is rank q'-1 (or C-1 if q' = 0), the
# smallest rank q' (or 0), and the spread is exactly (C - 1) m + q' = L - L // C < L: the work of one
# full-length row. Neighbouring ranks differ by about m = L / C, except across the q'-1 | q' boundary
# where the extra token makes it about L.


def in_seq_spread(L: int, C: int) -> int:
    b, q = divmod(L, 2 * C)
    assert b >= 1, "closed form derived for L >= 2C"
    if q == 0:
        return 0
    if q == 1:
        return 1 if C > 1 else 0
    if q <= C:
        return (q - 1) * (2 * b + 1)
    return (2 * C - 1) * (2 * b + 1) + b + 1 - b * q


def in_seq_spread_bound(L: int, C: int) -> int:
    b = L // (2 * C)
    return C * (3 * b + 2) - 2 * b


def _check_balance(L: int, C: int) -> tuple[int, int]:
    in_seq_work = plan_split([L], C, "in_seq").causal_work()
    rr_work = plan_split([L], C, "round_robin").causal_work()
    assert sum(in_seq_work) == sum(rr_work) == L * (L + 1) // 2
    in_seq = max(in_seq_work) - min(in_seq_work)
    rr = max(rr_work) - min(rr_work)
    assert in_seq == in_seq_spread(L, C), f"in-seq work {in_seq_work}"
    assert in_seq <= in_seq_spread_bound(L, C) < 1.5 * L + 2 * C
    assert rr == L - L // C, f"round-robin work {rr_work}"
    return in_seq, rr


@pytest.mark.parametrize(
    "L, C",
    [
        pytest.param(L, C, id=f"L{L}-C{C}")
        for L, C in [(64, 2), (70, 8), (100, 3), (1000, 6), (4096, 5), (4096, 7), (4096, 8)]  # 4096 % 14 = C + 1: worst
    ],
)
def test_causal_work_balance(L, C, record_property):
    in_seq, rr = _check_balance(L, C)
    mean = L * (L + 1) / 2 / C
    record_property("in_seq_spread", in_seq)
    record_property("round_robin_spread", rr)
    record_property("in_seq_spread_rel", in_seq / mean)
    record_property("round_robin_spread_rel", rr / mean)
    print(f"L={L} C={C}: work spread in-seq {in_seq} ({in_seq / mean:.1e} of a rank's work),", end=" ")
    print(f"round-robin {rr} ({rr / mean:.1e})")


@pytest.mark.parametrize("C", range(2, 9), ids=lambda C: f"C{C}")
def test_in_seq_balance_bound_is_tight(C):
    b = 64 // (2 * C) + 1
    L = 2 * C * b + C + 1  # q = C + 1: the worst remainder
    assert _check_balance(L, C)[0] == in_seq_spread_bound(L, C)


@settings(max_examples=60, deadline=None)
@given(L=st.integers(64, 4096), C=st.integers(2, 8))
def test_causal_work_balance_any_length(L, C):
    _check_balance(L, C)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_lens, cp_size, mode, match",
    [
        pytest.param([4], 0, "in_seq", r"cp_size.*\b0\b", id="cp_size=0"),
        pytest.param([4], -1, "in_seq", r"cp_size.*-1", id="cp_size=-1"),
        pytest.param([4], 2.0, "in_seq", r"cp_size.*2\.0", id="cp_size=2.0"),
        pytest.param([4], True, "in_seq", r"cp_size.*True", id="cp_size=True"),
        pytest.param([4], "2", "in_seq", r"cp_size.*'2'", id="cp_size='2'"),
        pytest.param([4], 2, "ring", re.escape("'ring'"), id="mode=ring"),
        pytest.param([4], 2, "In_Seq", re.escape("'In_Seq'"), id="mode=In_Seq"),
        pytest.param([4], 2, None, r"mode.*None", id="mode=None"),
        pytest.param([4, 0], 2, "in_seq", r"seq_lens\[1\] = 0\b", id="len=0"),
        pytest.param([-3], 2, "round_robin", r"seq_lens\[0\] = -3\b", id="len=-3"),
        pytest.param([4, 2.5], 2, "in_seq", r"seq_lens\[1\] = 2\.5", id="len=2.5"),
        pytest.param([4.0], 2, "round_robin", r"seq_lens\[0\] = 4\.0", id="len=4.0"),
        pytest.param([True], 2, "in_seq", r"seq_lens\[0\] = True", id="len=True"),
        pytest.param(["4"], 2, "in_seq", r"seq_lens\[0\] = '4'", id="len='4'"),
        pytest.param([], 2, "in_seq", r"seq_lens.*empty", id="empty-batch"),
        pytest.param("44", 2, "in_seq", r"seq_lens.*'44'", id="seq_lens=str"),
    ],
)
def test_bad_input_is_a_value_error(seq_lens, cp_size, mode, match):
    with pytest.raises(ValueError, match=match):
        plan_split(seq_lens, cp_size, mode)
