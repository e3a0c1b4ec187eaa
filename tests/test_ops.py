"""Sparse-attention stage ops (`cp_attn.ops`): indexer logits, top-k, sparse MLA, the dense-mask
oracle and the e4m3 helpers.

Reference: plain-Python / float64 re-derivations written here from DESIGN.md section 2 and the ops'
docstrings: per-(i, j, h) loops for the indexer logits, a sort by (-score, index) for top-k, an
explicit per-row softmax over the selected keys for sparse MLA, the naive (decompressed) MLA form
through `dense_masked_attention` for the absorbed-equivalence check, and `math.frexp`-exact
power-of-two scales with e4m3's rounding bound for FP8. No op under test builds its own expectation.
Letters: n query rows, T keys, H heads, D head dim, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cp_attn.ops import (
    INVALID,
    dense_causal_mask,
    dense_masked_attention,
    indexer_logits,
    key_mask,
    sparse_mla,
    topk_indices,
    topk_mask,
)
from cp_attn.ops.fp8 import E4M3_MAX, fake_quant_e4m3_lastdim, pow2_block_scale, quantize_e4m3_lastdim

# fp32 op vs float64 reference on O(1) inputs with at most a few dozen terms per sum: the only
# difference is fp32 rounding and summation order, a few ulp of the largest partial sum (~1e-6).
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# e4m3 has 3 mantissa bits: round-to-nearest of a normal value is off by at most half an ulp,
# i.e. 2^-4 of the value.
E4M3_REL_ERR = 2.0**-4
# Below e4m3's smallest normal (2^-6) the grid is uniform with spacing 2^-9 (in units of the block
# scale), so the absolute rounding error there is at most 2^-10 * scale.
E4M3_SUBNORMAL_ABS_ERR = 2.0**-10
# DeepSeek's indexer rule clamps a block's amax to at least this before picking the scale.
AMAX_FLOOR = 1e-4

SETTINGS = settings(max_examples=200, deadline=None)


@pytest.fixture
def nan_empty(monkeypatch):
    """Uninitialised float buffers (torch.empty / Tensor.new_empty) come back NaN-filled, so an op
    that leaves a row unwritten fails the comparison instead of passing on stale zeros."""
    empty, new_empty = torch.empty, torch.Tensor.new_empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(new_empty(self, *a, **k)))


def random_ranges(n: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] ks <= ke in [0, T], with the first row forced empty (ks == ke) and the second full."""
    a = torch.randint(0, T + 1, (n,), generator=g)
    b = torch.randint(0, T + 1, (n,), generator=g)
    ks, ke = torch.minimum(a, b), torch.maximum(a, b)
    ks[0] = ke[0] = T // 2
    if n > 1:
        ks[1], ke[1] = 0, T
    return ks, ke


# ---- indexer logits -----------------------------------------------------------------------------


def ref_indexer_logits(q, k, w, ks, ke):
    """out[i][j] = sum_h w[i][h] * relu(sum_d q[i][h][d] * k[j][d]) for ks[i] <= j < ke[i], else -inf."""
    n, H, D = q.shape
    T = k.shape[0]
    q, k, w = q.double().tolist(), k.double().tolist(), w.double().tolist()
    out = [[float("-inf")] * T for _ in range(n)]
    for i in range(n):
        for j in range(int(ks[i]), int(ke[i])):
            total = 0.0
            for h in range(H):
                dot = sum(q[i][h][d] * k[j][d] for d in range(D))
                total += w[i][h] * max(dot, 0.0)
            out[i][j] = total
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n,T,H,D", [(1, 1, 1, 1), (6, 9, 3, 4), (9, 5, 4, 8), (4, 16, 2, 16)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_indexer_logits_matches_loop_reference(n, T, H, D, dtype):
    g = torch.Generator().manual_seed(n * 1000 + T)
    q = torch.randn(n, H, D, generator=g).to(dtype)
    k = torch.randn(T, D, generator=g).to(dtype)
    w = torch.randn(n, H, generator=g)  # signed: negative head weights are legal
    ks, ke = random_ranges(n, T, g)
    out = indexer_logits(q, k, w, ks, ke)
    assert out.shape == (n, T) and out.dtype == torch.float32
    ref = ref_indexer_logits(q, k, w, ks, ke)
    inside = key_mask(ks, ke, T)
    assert torch.isneginf(out[~inside]).all(), "keys outside [ks, ke) must be -inf"
    assert torch.isfinite(out[inside]).all()
    torch.testing.assert_close(out.double()[inside], ref[inside], atol=FP32_ATOL, rtol=FP32_RTOL)


def test_indexer_logits_relu_zeroes_negative_dots():
    # One head, weight 1: the logit is exactly relu(q . k).
    q = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])
    k = torch.tensor([[2.0, 5.0], [-3.0, 1.0]])
    out = indexer_logits(q, k, torch.ones(2, 1), torch.tensor([0, 0]), torch.tensor([2, 2]))
    assert out.tolist() == [[2.0, 0.0], [0.0, 3.0]]


# ---- top-k --------------------------------------------------------------------------------------


def ref_topk(scores: list[float], ks: int, ke: int, K: int) -> list[int]:
    """Valid keys sorted by (-score, index), the first min(K, ke - ks), ascending, -1 padded to K."""
    best = sorted(range(ks, ke), key=lambda j: (-scores[j], j))[: min(K, ke - ks)]
    return sorted(best) + [INVALID] * (K - len(best))


@st.composite
def topk_cases(draw):
    T = draw(st.integers(1, 24))
    n = draw(st.integers(1, 6))
    # Integer-valued scores from a tiny range, mostly zero: ties everywhere, also at the cut.
    value = st.sampled_from([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, -1.0, 3.0])
    scores = [draw(st.lists(value, min_size=T, max_size=T)) for _ in range(n)]
    ranges = []
    for _ in range(n):
        ks = draw(st.integers(0, T))
        ranges.append((ks, draw(st.integers(ks, T))))  # ks == ke: empty row
    K = draw(st.integers(1, T + 4))  # K > T and K > ke - ks both reachable
    return scores, ranges, K


def run_topk(scores, ranges, K):
    logits = torch.tensor(scores, dtype=torch.float32)
    ks = torch.tensor([r[0] for r in ranges])
    ke = torch.tensor([r[1] for r in ranges])
    # Outside [ks, ke) the op must ignore whatever is there; put the best scores there.
    logits = logits.masked_fill(~key_mask(ks, ke, logits.shape[1]), 100.0)
    return topk_indices(logits, ks, ke, K), scores


@SETTINGS
@given(topk_cases())
@example(([[0.0] * 6], [(0, 6)], 3))              # all tied: lowest indices win
@example(([[0.0, 5.0, 0.0, 5.0, 0.0, 5.0]], [(2, 6)], 3))  # tie at the cut inside an offset range
@example(([[1.0, 2.0]], [(1, 1)], 4))             # empty row, K > T
@example(([[1.0, 2.0, 3.0]], [(0, 3)], 8))        # K > T: everything, then padding
def test_topk_matches_sorted_reference(case):
    scores, ranges, K = case
    out, _ = run_topk(*case)
    assert out.dtype == torch.int32 and out.shape == (len(scores), K)
    for i, (ks, ke) in enumerate(ranges):
        assert out[i].tolist() == ref_topk(scores[i], ks, ke, K), f"row {i}, range [{ks}, {ke}), K={K}"


@pytest.mark.parametrize(
    "scores,ks,ke,K,want",
    [
        ([0, 5, 0, 5, 0, 5], 0, 6, 4, [0, 1, 3, 5]),
        ([0, 5, 0, 5, 0, 5], 2, 6, 3, [2, 3, 5]),
        ([7, 1, 1, 1, 1, 7], 0, 6, 3, [0, 1, 5]),
        ([2, 2, 2, 2], 1, 4, 2, [1, 2]),
        ([3, 0, 0], 0, 3, 5, [0, 1, 2, -1, -1]),
        ([3, 0, 0], 3, 3, 2, [-1, -1]),
    ],
    ids=["cut-tie-first-zero", "cut-tie-offset-range", "many-ones-lowest", "all-tied-offset",
         "short-row-padded", "empty-row"],
)
def test_topk_ties_at_cut_go_to_lower_index(scores, ks, ke, K, want):
    out = topk_indices(torch.tensor([scores], dtype=torch.float32), torch.tensor([ks]), torch.tensor([ke]), K)
    assert out.tolist() == [want]


def test_topk_no_rows():
    out = topk_indices(torch.empty(0, 5), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 3)
    assert out.shape == (0, 3)


# ---- sparse MLA ---------------------------------------------------------------------------------


def random_indices(n: int, T: int, K: int, g: torch.Generator) -> torch.Tensor:
    """[n, K] duplicate-free indices into T keys with -1 in random slots; row 0 has no valid index,
    row 1 (if any) is full when K <= T."""
    idx = torch.full((n, K), INVALID, dtype=torch.int32)
    for i in range(n):
        if i == 0:
            continue
        count = K if i == 1 else int(torch.randint(0, K + 1, (1,), generator=g))
        count = min(count, T)
        keys = torch.randperm(T, generator=g)[:count]
        slots = torch.randperm(K, generator=g)[:count]
        idx[i, slots] = keys.to(torch.int32)
    return idx


def ref_sparse_mla(q, kv, idx, scale, d_v):
    """Per (row, head): softmax over the selected keys' scaled scores, in float64."""
    n, H, _ = q.shape
    out = torch.zeros(n, H, d_v, dtype=torch.float64)
    lse = torch.full((n, H), float("-inf"), dtype=torch.float64)
    for i in range(n):
        sel = [j for j in idx[i].tolist() if j >= 0]
        if not sel:
            continue
        keys = kv.double()[sel]                               # [k, Dqk]
        for h in range(H):
            s = [float(q[i, h].double() @ keys[m]) * scale for m in range(len(sel))]
            top = max(s)
            total = sum(math.exp(x - top) for x in s)
            lse[i, h] = top + math.log(total)                 # natural log
            for m in range(len(sel)):
                out[i, h] += math.exp(s[m] - top) / total * keys[m, :d_v]
    return out, lse


@pytest.mark.parametrize("n,T,K,chunk", [(1, 4, 2, 256), (7, 10, 4, 3), (10, 6, 8, 4), (5, 12, 12, 5)],
                         ids=["one-row", "n7-chunk3", "K-gt-T-chunk4", "n5-chunk5-exact"])
def test_sparse_mla_matches_per_row_softmax(n, T, K, chunk, nan_empty):
    H, Dqk, d_v = 3, 10, 6
    g = torch.Generator().manual_seed(n * 31 + T)
    q = torch.randn(n, H, Dqk, generator=g)
    kv = torch.randn(T, Dqk, generator=g)
    idx = random_indices(n, T, K, g)
    scale = 0.37
    out, lse = sparse_mla(q, kv, idx, scale, d_v, chunk=chunk)
    assert out.shape == (n, H, d_v) and out.dtype == q.dtype
    assert lse.shape == (n, H) and lse.dtype == torch.float32
    ref_out, ref_lse = ref_sparse_mla(q, kv, idx, scale, d_v)
    torch.testing.assert_close(out.double(), ref_out, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=FP32_ATOL, rtol=FP32_RTOL)
    # Row 0 has no valid index: output exactly 0 and lse -inf.
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


def test_sparse_mla_lse_is_natural_log():
    # One key with scaled score s: lse == s exactly; two equal keys: lse == s + ln 2.
    q = torch.tensor([[[1.0, 2.0]]])
    kv = torch.tensor([[3.0, 0.5], [3.0, 0.5]])
    _, lse1 = sparse_mla(q, kv, torch.tensor([[0, -1]]), 0.5, 1)
    _, lse2 = sparse_mla(q, kv, torch.tensor([[0, 1]]), 0.5, 1)
    s = 0.5 * (3.0 + 1.0)
    assert lse1.item() == pytest.approx(s, abs=FP32_ATOL)
    assert lse2.item() == pytest.approx(s + math.log(2.0), abs=FP32_ATOL)


@pytest.mark.parametrize("n,T,K", [(6, 9, 4), (8, 5, 8)], ids=["K-lt-T", "K-gt-T"])
def test_sparse_mla_absorbed_equals_dense_mask_oracle(n, T, K, nan_empty):
    """Absorbed MLA over the latent == naive MLA (per-head k/v decompressed) with the top-k mask."""
    H, nope, rope, C, V = 3, 5, 4, 7, 6
    g = torch.Generator().manual_seed(7 * n + T)
    w_uk = torch.randn(H, nope, C, generator=g) / C**0.5
    w_uv = torch.randn(H, V, C, generator=g) / C**0.5
    c_kv, k_pe = torch.randn(T, C, generator=g), torch.randn(T, rope, generator=g)
    q_nope, q_pe = torch.randn(n, H, nope, generator=g), torch.randn(n, H, rope, generator=g)
    idx = random_indices(n, T, K, g)
    scale = (nope + rope) ** -0.5

    k = torch.cat([torch.einsum("tc,hdc->thd", c_kv, w_uk), k_pe[:, None].expand(T, H, rope)], -1)
    v = torch.einsum("tc,hvc->thv", c_kv, w_uv)
    dense = dense_masked_attention(torch.cat([q_nope, q_pe], -1), k, v, topk_mask(idx, T), scale)

    q_abs = torch.cat([torch.einsum("nhd,hdc->nhc", q_nope, w_uk), q_pe], -1)
    o_lat, _ = sparse_mla(q_abs, torch.cat([c_kv, k_pe], -1), idx, scale, C, chunk=3)
    absorbed = torch.einsum("nhc,hvc->nhv", o_lat, w_uv)
    torch.testing.assert_close(absorbed, dense, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert (dense[0] == 0).all(), "a row with nothing to attend is 0 in the oracle too"


def test_topk_mask_and_causal_mask():
    idx = torch.tensor([[2, -1, 0], [-1, -1, -1], [4, 3, 1]])
    want = [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]]
    assert topk_mask(idx, 5).int().tolist() == want
    ks, ke = torch.tensor([0, 2, 3]), torch.tensor([1, 5, 3])
    assert dense_causal_mask(ks, ke, 5).int().tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]


# ---- FP8 (e4m3) helpers -------------------------------------------------------------------------


def ref_pow2_scale(amax: float) -> float:
    """2^ceil(log2(max(amax, 1e-4) / 448)), exactly (frexp instead of a rounded log2)."""
    r = max(amax, AMAX_FLOOR) / E4M3_MAX
    mant, exp = math.frexp(r)                 # r = mant * 2^exp, mant in [0.5, 1)
    return 2.0 ** (exp - 1 if mant == 0.5 else exp)


def blocks_of(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    return list(x.split(block, dim=-1))


# Rows at very different magnitudes, one all-zero and one below the amax floor.
def fp8_input(shape, g):
    x = torch.randn(*shape, generator=g)
    mags = torch.tensor([1.0, 1e3, 3e-3, 0.0, 1e-6, 448.0, 449.0])
    return x * mags[torch.arange(shape[0]) % len(mags)].view(-1, *[1] * (len(shape) - 1))


@pytest.mark.parametrize("D,block", [(128, 128), (200, 128), (40, 16), (7, 4)], ids=lambda v: str(v))
def test_e4m3_scales_are_pow2_of_amax(D, block):
    g = torch.Generator().manual_seed(D)
    x = fp8_input((7, 3, D), g)
    q, scale = quantize_e4m3_lastdim(x, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == (7, 3, -(-D // block))
    for b, xb in enumerate(blocks_of(x, block)):
        amax = xb.abs().amax(-1)
        want = torch.tensor([ref_pow2_scale(float(a)) for a in amax.flatten()]).view(amax.shape)
        assert torch.equal(scale[..., b], want), f"block {b}"
        mant, _ = torch.frexp(scale[..., b])
        assert (mant == 0.5).all(), "scales must be powers of two"
    assert q.float().abs().max() <= E4M3_MAX


@pytest.mark.parametrize("amax,want", [(448.0, 1.0), (449.0, 2.0), (896.0, 2.0), (1.75, 2.0**-8), (0.0, 2.0**-22),
                                       (1e-9, 2.0**-22)],
                         ids=["exact-1", "just-over", "exact-2", "small", "zero-clamped", "tiny-clamped"])
def test_pow2_block_scale_edges(amax, want):
    # 1e-4 / 448 = 2.23e-7, and 2^-22 = 2.38e-7 is the next power of two up.
    assert pow2_block_scale(torch.tensor([amax])).item() == want


@pytest.mark.parametrize("D,block", [(128, 128), (200, 128), (40, 16)], ids=lambda v: str(v))
def test_e4m3_round_trip_error_bound(D, block):
    g = torch.Generator().manual_seed(D + 1)
    x = fp8_input((7, 5, D), g)
    q, scale = quantize_e4m3_lastdim(x, block)
    y = fake_quant_e4m3_lastdim(x, block)
    assert y.dtype == torch.float32 and y.shape == x.shape
    s = scale.repeat_interleave(block, -1)[..., :D]        # each element's block scale
    torch.testing.assert_close(y, q.float() * s, atol=0, rtol=0)
    err = (y - x).abs()
    bound = E4M3_REL_ERR * x.abs() + E4M3_SUBNORMAL_ABS_ERR * s
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    # The bound is not vacuous: the round trip really does move values, by up to ~2^-4 relative.
    normal = x.abs() >= 2.0**-6 * s
    rel = (err[normal] / x.abs()[normal]).max().item()
    assert 2.0**-6 < rel <= E4M3_REL_ERR
    # And y sits on the scaled e4m3 grid (dequantising again changes nothing).
    torch.testing.assert_close((y / s).to(torch.float8_e4m3fn).float() * s, y, atol=0, rtol=0)


def test_nan_empty_fixture_is_live(nan_empty):
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.zeros(1).new_empty((2, 2))).all()
    assert torch.empty(2, dtype=torch.int32).shape == (2,)  # integer buffers are left alone
