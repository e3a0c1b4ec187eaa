"""Fast indexer kernels against their naive twins: Triton logits (fp16/fp32/bf16 and FP8), Triton
exact top-k, the DeepGEMM adapter.

References: `cp_attn.ops.naive.indexer_logits` / `topk_indices` (themselves checked against
float64 loops and a sorted reference in test_ops.py), and a float64 loop here for the naive FP8 form.
The kernels run on CPU under TRITON_INTERPRET=1 in a child pytest process (`test_interpreter_child`):
triton decides interpreted-or-compiled when a kernel is defined, so the interpreter must not leak
into this process or into the GPU tests. The interpreter multiplies bf16 bit patterns in `tl.dot`
(triton issue 11584), so CPU runs use fp16/fp32 and FP8; bf16 is checked on the GPU.
Letters: n query rows, T keys, H heads, D head dim, K top-k.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from cp_attn.ops import get_kernels, naive
from cp_attn.ops.kernels import IMPLS
from cp_attn.ops.kv_fp8 import quantize_index_k, quantize_index_q

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERP

interp = pytest.mark.skipif(not (INTERP and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child")


def on_gpu(fn):
    """A GPU test: marked `gpu`, skipped without CUDA and triton."""
    return pytest.mark.gpu(pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")(fn))


# Logit errors are measured against mag[i, j] = sum_h |w| sum_d |q k| (times the key scale): the
# size of the sum before cancellation, which bounds every rounding error.
# fp32 accumulation, any order: a D-term dot then an H-term head sum is off by at most
# ~(D + H) * 2^-24 * mag = 1.1e-5 * mag at D=128, H=64; typical errors are ~100x smaller.
FP32_SUM_REL = 2e-5
# Hopper's fp8 wgmma keeps ~14 bits in its accumulator (DeepSeek-V3 technical report), over
# D/32 = 4 k-steps: <= 4 * 2^-13 * mag = 5e-4 * mag; 2e-3 leaves room, a wrong head, scale or key
# is O(1).
FP8_MMA_REL = 2e-3
# Top-k of FP8 logits vs bf16 logits on Gaussian inputs at V3.2 shapes: e4m3 rounding (3 mantissa
# bits) moves keys near the cut; measured 0.95-0.96 per row in fp32 on CPU (8 rows x 64K keys,
# K=2048). A wrong scale or key order gives ~K/T.
FP8_TOPK_OVERLAP = 0.9


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh buffers come back NaN (float) or -7 (int), so an element a kernel leaves unwritten fails
    the comparison instead of passing on whatever was in memory."""
    empty = torch.empty

    def fill(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", fill)


def ragged_ranges(n: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [ks, ke) per row, plus the edge rows: empty at 0, one key, the whole row, empty at T,
    one key at the end."""
    ks = torch.randint(0, T + 1, (n,), generator=g)
    ke = torch.minimum(ks + torch.randint(0, T + 1, (n,), generator=g), torch.tensor(T))
    special = [(0, 0), (min(5, T - 1), min(6, T)), (0, T), (T, T), (T - 1, T)]
    for i, (s, e) in enumerate(special[:n]):
        ks[i], ke[i] = s, e
    return ks, ke


def magnitude(q, k, w) -> torch.Tensor:
    """[n, T] float64: sum_h |w| sum_d |q k| (k dequantised in the FP8 form), computed as
    (sum_h |w| |q|) @ |k|^T since every term is non-negative."""
    kf = k[0].double() * k[1].double()[:, None] if isinstance(k, tuple) else k.double()
    return torch.einsum("nh,nhd->nd", w.double().abs(), q.double().abs()) @ kf.abs().T


def assert_logits_close(out, ref, mag, rel, what):
    neg_inf = ref == float("-inf")
    assert torch.equal(out == float("-inf"), neg_inf), f"{what}: -inf pattern differs"
    err = (out.double() - ref.double()).abs()[~neg_inf]
    bound = rel * mag[~neg_inf] + 1e-30
    assert not torch.isnan(err).any(), f"{what}: NaN in range"
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.3g}x the allowed {rel:g} * magnitude"


def logits_inputs(n, T, H, D, dtype, seed, device="cpu"):
    """(q, k, w) in the bf16/fp16/fp32 form, or the FP8 form (q scale folded into w) for 'fp8'."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, H, D, generator=g), torch.randn(T, D, generator=g)
    w = torch.randn(n, H, generator=g) * (H**-0.5 * D**-0.5)
    if dtype == "fp8":
        qv, qs = quantize_index_q(q)
        kv, kscale = quantize_index_k(k)
        return qv.to(device), (kv.to(device), kscale.to(device)), (w * qs).to(device)
    return q.to(device, dtype), k.to(device, dtype), w.to(device)


# --- the naive FP8 form and the registry (no triton needed) ------------------------------------


def test_naive_fp8_form_matches_loop():
    n, T, H, D = 3, 7, 2, 8
    q, k, w = logits_inputs(n, T, H, D, "fp8", seed=0)
    ks, ke = torch.tensor([0, 2, 4]), torch.tensor([7, 2, 6])
    out = naive.indexer_logits(q, k, w, ks, ke)
    for i in range(n):
        for j in range(T):
            if not ks[i] <= j < ke[i]:
                assert out[i, j] == float("-inf")
                continue
            want = sum(float(w[i, h]) * max(0.0, sum(float(q[i, h, d]) * float(k[0][j, d]) for d in range(D)))
                       for h in range(H)) * float(k[1][j])
            assert abs(float(out[i, j]) - want) <= FP32_SUM_REL * float(magnitude(q, k, w)[i, j]) + 1e-30


def test_registry_names_the_indexer_kernels():
    assert {"triton", "deepgemm"} <= set(IMPLS["indexer_logits"]) and "triton" in IMPLS["topk_indices"]
    if importlib.util.find_spec("deep_gemm") is None:
        with pytest.raises(ValueError, match="not available"):
            get_kernels("torch", {"indexer_logits": "deepgemm"})
    if HAS_TRITON:
        ks = get_kernels("torch", {"indexer_logits": "triton", "topk_indices": "triton"})
        assert ks.indexer_logits.__module__ == "cp_attn.ops.indexer_triton"
        assert ks.topk_indices.__module__ == "cp_attn.ops.topk_triton"


@pytest.mark.skipif(INTERP or not HAS_TRITON, reason="this is the parent; needs triton")
def test_interpreter_child():
    """Runs this file's interpreter tests on CPU in a child process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "interp_"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# --- interpreter tests (CPU, TRITON_INTERPRET=1) ------------------------------------------------

LOGIT_CASES = [  # (n, T, H, D): the tiny preset, a 32-head and a V3.2-wide head count
    (9, 70, 4, 16),
    (11, 300, 32, 128),
    (7, 260, 64, 128),
]


@interp
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("n,T,H,D", LOGIT_CASES, ids=lambda v: str(v))
def test_interp_logits_match_naive(n, T, H, D, dtype, nan_empty):
    from cp_attn.ops.indexer_triton import indexer_logits

    tdt = {"fp32": torch.float32, "fp16": torch.float16, "fp8": "fp8"}[dtype]
    q, k, w = logits_inputs(n, T, H, D, tdt, seed=n + T)
    ks, ke = ragged_ranges(n, T, torch.Generator().manual_seed(T))
    out = indexer_logits(q, k, w, ks, ke)
    assert_logits_close(out, naive.indexer_logits(q, k, w, ks, ke), magnitude(q, k, w), FP32_SUM_REL,
                        f"{dtype} H={H} D={D}")


@interp
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_interp_every_autotune_config(splits, nan_empty):
    from cp_attn.ops.indexer_triton import CONFIGS, indexer_logits

    n, T, H, D = 9, 300, 32, 128
    for i, config in enumerate(CONFIGS):
        q, k, w = logits_inputs(n, T, H, D, "fp8", seed=i)
        ks, ke = ragged_ranges(n, T, torch.Generator().manual_seed(i))
        ke[-2:] = torch.tensor([T - 1, T])                # and two rows ending like causal ones
        out = indexer_logits(q, k, w, ks, ke, config=config, splits=splits)
        assert_logits_close(out, naive.indexer_logits(q, k, w, ks, ke), magnitude(q, k, w), FP32_SUM_REL,
                            f"config {config}, {splits} splits")


@interp
def test_interp_logits_refuse_mixed_dtypes():
    from cp_attn.ops.indexer_triton import indexer_logits

    q, k, w = logits_inputs(2, 5, 4, 16, torch.float16, seed=0)
    ks, ke = torch.zeros(2, dtype=torch.long), torch.full((2,), 5)
    with pytest.raises(ValueError, match="share"):
        indexer_logits(q, k.float(), w, ks, ke)
    with pytest.raises(ValueError, match="FP8"):
        indexer_logits(q, quantize_index_k(k), w, ks, ke)


def tie_scores(kind: str, n: int, T: int, g: torch.Generator) -> torch.Tensor:
    """[n, T] fp32 scores full of exact ties of several kinds."""
    if kind == "gauss":
        return torch.randn(n, T, generator=g)
    if kind == "small_ints":                               # values in {-2..2}: ties everywhere
        return torch.randint(-2, 3, (n, T), generator=g).float()
    if kind == "signed_zeros":                             # relu * negative weight -> -0.0 beside +0.0
        x = torch.randn(n, T, generator=g).relu()
        return x * torch.where(torch.rand(n, T, generator=g) < 0.5, -1.0, 1.0)
    if kind == "all_equal":
        return torch.full((n, T), 0.25)
    if kind == "neg_inf":                                  # in-range -inf everywhere
        return torch.full((n, T), float("-inf"))
    if kind == "sparse_inf":                               # -inf beside a few tied values
        x = torch.full((n, T), float("-inf"))
        x[:, ::3] = torch.randint(0, 2, (n, (T + 2) // 3), generator=g).float()
        return x
    raise ValueError(kind)


TIE_KINDS = ["gauss", "small_ints", "signed_zeros", "all_equal", "neg_inf", "sparse_inf"]


# (block, sample, cap): one chunk per row; chunks of 16 (many chunks, unaligned range ends); the
# sampled bracket (rows of >= 4 * 32 keys) with chunks of 64; the same with brackets over 8 keys
# sent on to the radix select. Production uses chunks of 2048, samples of 1024 (rows of >= 4096
# keys) and 4096 keys of scratch; the code paths are the same.
TOPK_PATHS = {"radix_one_chunk": (None, 0, 1), "radix_chunks16": (16, 0, 1), "sampled": (64, 32, 4096),
              "sampled_overflow": (64, 32, 8)}


@interp
@pytest.mark.parametrize("path", list(TOPK_PATHS))
@pytest.mark.parametrize("K", [1, 40])
@pytest.mark.parametrize("kind", TIE_KINDS)
def test_interp_topk_equals_naive(kind, K, path, nan_empty):
    from cp_attn.ops.topk_triton import topk_indices

    n, T = 6, 400
    g = torch.Generator().manual_seed(K)
    scores = tie_scores(kind, n, T, g)
    ks, ke = ragged_ranges(n, T, g)
    ks[-1], ke[-1] = 3, T - 2                              # a long row: sampled where sampling is on
    block, sample, cap = TOPK_PATHS[path]
    got = topk_indices(scores, ks, ke, K, block=block, sample=sample, cap=cap)
    assert torch.equal(got, naive.topk_indices(scores, ks, ke, K))


@interp
@pytest.mark.parametrize("T,K", [(1, 4), (37, 64), (40, 40)], ids=["one_key", "topk_gt_T", "topk_eq_T"])
def test_interp_topk_short_rows(T, K, nan_empty):
    from cp_attn.ops.topk_triton import topk_indices

    g = torch.Generator().manual_seed(T)
    scores = tie_scores("small_ints", 5, T, g)
    ks, ke = ragged_ranges(5, T, g)
    assert torch.equal(topk_indices(scores, ks, ke, K), naive.topk_indices(scores, ks, ke, K))


@interp
def test_interp_topk_strided_rows_and_no_rows():
    from cp_attn.ops.topk_triton import topk_indices

    wide = tie_scores("small_ints", 6, 200, torch.Generator().manual_seed(3))
    view = wide[:, 20:170]                                # rows with stride 200, not 150
    ks, ke = torch.tensor([0, 3, 10, 0, 149, 60]), torch.tensor([150, 140, 10, 77, 150, 61])
    assert torch.equal(topk_indices(view, ks, ke, 9), naive.topk_indices(view, ks, ke, 9))
    empty = torch.empty(0, dtype=torch.long)
    assert topk_indices(torch.zeros(0, 5), empty, empty, 3).shape == (0, 3)


POOL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, float("-inf")]


@st.composite
def topk_cases(draw):
    T = draw(st.integers(1, 120))
    n = draw(st.integers(1, 4))
    K = draw(st.integers(1, 40))
    rows = [draw(st.lists(st.sampled_from(POOL), min_size=T, max_size=T)) for _ in range(n)]
    ranges = [sorted(draw(st.lists(st.integers(0, T), min_size=2, max_size=2))) for _ in range(n)]
    return torch.tensor(rows), torch.tensor([r[0] for r in ranges]), torch.tensor([r[1] for r in ranges]), K


@interp
@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: slow here
@given(topk_cases())
def test_interp_topk_equals_naive_on_drawn_ties(case):
    from cp_attn.ops.topk_triton import topk_indices

    scores, ks, ke, K = case
    assert torch.equal(topk_indices(scores, ks, ke, K, block=16), naive.topk_indices(scores, ks, ke, K))


# --- GPU tests at V3.2 shapes -------------------------------------------------------------------

V32 = dict(H=64, D=128, K=2048)


def v32_rows(n: int, T: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """The last n rows of a causal sequence of T keys, then ragged rows: empty, one key, one key at
    the end, a window in the middle."""
    ke = torch.arange(T - n, T) + 1
    ks = torch.zeros(n, dtype=torch.long)
    extra_ks, extra_ke = torch.tensor([5, 0, T - 1, T // 3]), torch.tensor([5, 1, T, T // 3 + 5000])
    return torch.cat([ks, extra_ks]).to(device), torch.cat([ke, extra_ke]).to(device)


GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": "fp8"}
# bf16 products are exact in fp32 and fp32 dots run in IEEE fp32: only the summation order differs.
GPU_REL = {"fp32": FP32_SUM_REL, "bf16": FP32_SUM_REL, "fp8": FP8_MMA_REL}


@on_gpu
@pytest.mark.parametrize("dtype,T", [("fp32", 4096), ("bf16", 4096), ("bf16", 65536), ("fp8", 4096),
                                     ("fp8", 65536)], ids=lambda v: str(v))
@pytest.mark.usefixtures("nan_empty")
def test_gpu_logits_match_naive(dtype, T):
    from cp_attn.ops.indexer_triton import indexer_logits

    ks, ke = v32_rows(124, T)
    q, k, w = logits_inputs(128, T, V32["H"], V32["D"], GPU_DTYPES[dtype], 1, "cuda")
    out = indexer_logits(q, k, w, ks, ke)
    ref = naive.indexer_logits(q, k, w, ks, ke)
    assert_logits_close(out, ref, magnitude(q, k, w), GPU_REL[dtype], f"{dtype} T={T}")


@on_gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_gpu_every_autotune_config(dtype):
    from cp_attn.ops.indexer_triton import CONFIGS, indexer_logits

    ks, ke = v32_rows(252, 4096)
    for i, config in enumerate(CONFIGS):
        q, k, w = logits_inputs(256, 4096, V32["H"], V32["D"], GPU_DTYPES[dtype], i, "cuda")
        out = indexer_logits(q, k, w, ks, ke, config=config)
        assert_logits_close(out, naive.indexer_logits(q, k, w, ks, ke), magnitude(q, k, w), GPU_REL[dtype],
                            f"{dtype} config {config}")


def assert_independent_of_grouping(indexer_logits, q, k, w, ks, ke, **kw):
    """Rows 2..n-3 scored on their own (other row blocks, other splits) equal, bit for bit, the same
    rows scored within the whole batch: what lets a CP rank reproduce the single-GPU logits. (GPU
    only: the interpreter's numpy matmul rounds a column differently by its place in the tile.)"""
    full = indexer_logits(q, k, w, ks, ke, **kw)
    sub = slice(2, q.shape[0] - 2)
    part = indexer_logits(q[sub], k, w[sub], ks[sub], ke[sub], splits=3, **kw)
    assert torch.equal(part, full[sub])


@on_gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_gpu_logits_independent_of_row_grouping(dtype):
    from cp_attn.ops.indexer_triton import CONFIGS, indexer_logits

    ks, ke = v32_rows(124, 8192)
    q, k, w = logits_inputs(128, 8192, V32["H"], V32["D"], GPU_DTYPES[dtype], 6, "cuda")
    for config in ([None] if dtype == "fp32" else CONFIGS):   # fp32 always runs CONFIGS[0]
        assert_independent_of_grouping(indexer_logits, q, k, w, ks, ke, config=config)


@on_gpu
@pytest.mark.parametrize("ties", ["kernel_logits", "rounded", "relu_zeros", "all_equal"])
@pytest.mark.usefixtures("nan_empty")
def test_gpu_topk_equals_naive(ties):
    from cp_attn.ops.indexer_triton import indexer_logits
    from cp_attn.ops.topk_triton import topk_indices

    T = 65536
    ks, ke = v32_rows(60, T)
    q, k, w = logits_inputs(64, T, V32["H"], V32["D"], torch.bfloat16, 2, "cuda")
    logits = indexer_logits(q, k, w, ks, ke)
    fin = torch.isfinite(logits)
    if ties == "rounded":                                  # a coarse grid: thousands of equal scores
        logits = torch.where(fin, (logits * 4).round() / 4, logits)
    elif ties == "relu_zeros":                             # most scores exactly +-0.0
        logits = torch.where(fin, (logits - logits[fin].quantile(0.99)).relu() * -1, logits)
    elif ties == "all_equal":
        logits = torch.where(fin, torch.zeros_like(logits), logits)
    got = topk_indices(logits, ks, ke, V32["K"])
    assert torch.equal(got, naive.topk_indices(logits, ks, ke, V32["K"]))


@on_gpu
def test_gpu_fp8_topk_overlaps_bf16():
    from cp_attn.ops.indexer_triton import indexer_logits
    from cp_attn.ops.topk_triton import topk_indices

    T, n = 65536, 32
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(n, V32["H"], V32["D"], generator=g), torch.randn(T, V32["D"], generator=g)
    w = torch.randn(n, V32["H"], generator=g) * (V32["H"] ** -0.5 * V32["D"] ** -0.5)
    ke = (torch.arange(T - n, T) + 1).cuda()
    ks = torch.zeros_like(ke)
    bf = topk_indices(indexer_logits(q.cuda().bfloat16(), k.cuda().bfloat16(), w.cuda(), ks, ke), ks, ke, V32["K"])
    qv, qs = quantize_index_q(q.bfloat16())
    kk = quantize_index_k(k.bfloat16())
    f8 = topk_indices(indexer_logits(qv.cuda(), (kk[0].cuda(), kk[1].cuda()), (w * qs).cuda(), ks, ke),
                      ks, ke, V32["K"])
    overlap = [len(set(a.tolist()) & set(b.tolist())) / V32["K"] for a, b in zip(bf.cpu(), f8.cpu())]
    assert min(overlap) >= FP8_TOPK_OVERLAP, f"fp8/bf16 top-k overlap {min(overlap):.3f}"


@on_gpu
def test_gpu_deepgemm_matches_naive_fp8():
    pytest.importorskip("deep_gemm")
    from cp_attn.ops.deepgemm import indexer_logits

    ks, ke = v32_rows(124, 8192)
    q, k, w = logits_inputs(128, 8192, V32["H"], V32["D"], "fp8", 4, "cuda")
    assert_logits_close(indexer_logits(q, k, w, ks, ke), naive.indexer_logits(q, k, w, ks, ke),
                        magnitude(q, k, w), FP8_MMA_REL, "deepgemm")
    qb, kb, wb = logits_inputs(128, 8192, V32["H"], V32["D"], torch.bfloat16, 4, "cuda")
    with pytest.raises(ValueError, match="FP8 form"):
        indexer_logits(qb, kb, wb, ks, ke)
    q16, k16, w16 = logits_inputs(128, 8192, 16, V32["D"], "fp8", 4, "cuda")
    with pytest.raises(ValueError, match="H in"):
        indexer_logits(q16, k16, w16, ks, ke)

