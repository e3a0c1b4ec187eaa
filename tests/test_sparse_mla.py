"""The Triton sparse MLA kernel (and the FP8 KV layout it reads) against the plain-torch op
cp_attn.ops.naive.sparse_mla, which the dense-mask oracle pins in test_model.py.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on small fp32/fp16 shapes: the
interpreter multiplies bf16 `tl.dot` operands as raw bits (triton-lang/triton#11584), so bf16 is
checked only on a GPU, at V3.2 shapes (the `gpu` tests below).
"""

from __future__ import annotations

import pytest
import torch

from cp_attn.ops import naive
from cp_attn.ops.kv_fp8 import mla_fp8_width, pack_mla_kv, unpack_mla_kv

triton = pytest.importorskip("triton")
from cp_attn.ops import sparse_mla_triton as smt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # small shapes: compiled on a GPU, interpreted on CPU

# fp32 under the interpreter: both sides do fp32 math in another summation order.
FP32_ATOL = 1e-5
# fp16 operands, fp32 accumulation, P rounded to fp16 before PV (10-bit mantissa: 5e-4 relative).
FP16_ATOL = 3e-3
# bf16 on the GPU against the fp32 torch op on the same bf16 inputs: P is rounded to bf16 (2^-9 = 2e-3
# relative per element) before PV and the output to bf16; averaged over ~2K keys the relative L2 error
# lands near 3e-3 (FlashMLA measured 2.1e-3 here). 1e-2 fails any wrong row, head or index.
BF16_REL_L2 = 1e-2
# lse: fp32 scores from bf16 products, fp32 online softmax; only summation order differs.
LSE_ATOL = 2e-3

CASES = {  # n, H, d_v, rope, T, K
    "tiny-preset": (6, 4, 32, 8, 40, 8),
    "no-rope-tail": (3, 3, 20, 0, 17, 11),
    "odd-heads": (4, 5, 24, 8, 33, 20),
    "wide-K": (2, 4, 32, 8, 90, 70),
}


def _rand_indices(n: int, T: int, K: int, g: torch.Generator) -> torch.Tensor:
    """Any order, -1 anywhere, indices past T (also skipped), one all-invalid row, one duplicate."""
    idx = torch.randint(-1, T + 3, (n, K), generator=g, dtype=torch.int32)
    idx[0] = -1
    idx[-1, 1] = idx[-1, 0]
    return idx


def _topk_layout(n: int, T: int, K: int, g: torch.Generator) -> torch.Tensor:
    """Valid indices first, ascending, -1 after: row i has i + 1 keys (capped by K and T)."""
    idx = torch.full((n, K), -1, dtype=torch.int32)
    for i in range(n):
        m = min(i + 1, K, T)
        idx[i, :m] = torch.randperm(T, generator=g)[:m].sort().values.to(torch.int32)
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("layout", ["random", "topk"])
def test_matches_torch_op(case, dtype, layout):
    n, H, d_v, rope, T, K = CASES[case]
    g = torch.Generator().manual_seed(hash((case, layout)) % 2**31)
    q = torch.randn((n, H, d_v + rope), generator=g).to(dtype).to(DEVICE)
    kv = torch.randn((T, d_v + rope), generator=g).to(dtype).to(DEVICE)
    idx = (_rand_indices if layout == "random" else _topk_layout)(n, T, K, g).to(DEVICE)
    out, lse = smt.sparse_mla(q, kv, idx, 0.3, d_v)
    want, want_lse = naive.sparse_mla(q, kv, idx, 0.3, d_v)
    atol = FP32_ATOL if dtype == torch.float32 else FP16_ATOL
    assert out.dtype == dtype and out.shape == (n, H, d_v) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=atol, rtol=0)  # also -inf where naive is -inf
    empty = ~((idx >= 0) & (idx < T)).any(-1)
    assert (lse[empty] == float("-inf")).all() and (out[empty] == 0).all()


def test_fp8_kv_matches_torch_op_on_same_bytes():
    g = torch.Generator().manual_seed(3)
    n, H, d_v, rope, T, K = 5, 4, 32, 8, 40, 8
    q = torch.randn((n, H, d_v + rope), generator=g).to(DEVICE)
    packed = pack_mla_kv(torch.randn((T, d_v + rope), generator=g), d_v).to(DEVICE)
    assert packed.dtype == torch.uint8 and packed.shape == (T, mla_fp8_width(d_v, rope))
    idx = _rand_indices(n, T, K, g).to(DEVICE)
    out, lse = smt.sparse_mla(q, packed, idx, 0.3, d_v)
    want, want_lse = naive.sparse_mla(q, unpack_mla_kv(packed, d_v, torch.float32), idx, 0.3, d_v)
    torch.testing.assert_close(out, want, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("kv_lora,rope", [(512, 64), (32, 8), (200, 8)], ids=["v32", "tiny", "partial-block"])
def test_dequant_kernel_equals_unpack(kv_lora, rope):
    x = torch.randn((9, kv_lora + rope), generator=torch.Generator().manual_seed(kv_lora)) * 30
    packed = pack_mla_kv(x, kv_lora)
    got = smt.dequant_mla_kv(packed.to(DEVICE), kv_lora, rope, torch.float32).cpu()
    torch.testing.assert_close(got, unpack_mla_kv(packed, kv_lora, torch.float32), atol=0, rtol=0)


def test_empty_inputs():
    q = torch.randn((0, 4, 40), device=DEVICE)
    out, lse = smt.sparse_mla(q, torch.randn((5, 40), device=DEVICE), torch.zeros((0, 8), dtype=torch.int32, device=DEVICE), 0.3, 32)
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)
    q = torch.randn((2, 4, 40), device=DEVICE)
    out, lse = smt.sparse_mla(q, torch.randn((0, 40), device=DEVICE), torch.full((2, 8), -1, dtype=torch.int32, device=DEVICE), 0.3, 32)
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("bad", ["head-dim", "rows", "d_v", "dtype", "packed-width"])
def test_refuses_shapes_it_cannot_take(bad):
    q, kv, idx, d_v = torch.randn((2, 4, 40)), torch.randn((9, 40)), torch.zeros((2, 8), dtype=torch.int32), 32
    if bad == "head-dim":
        kv = torch.randn((9, 41))
    elif bad == "rows":
        idx = torch.zeros((3, 8), dtype=torch.int32)
    elif bad == "d_v":
        d_v = 41
    elif bad == "dtype":
        kv = kv.half()
    else:
        kv = torch.zeros((9, 50), dtype=torch.uint8)
    with pytest.raises(ValueError):
        smt.sparse_mla(q, kv, idx, 0.3, d_v)


# ---- GPU, V3.2 shapes ---------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
V32 = dict(H=128, d_v=512, rope=64, K=2048)


def _v32_case(n: int, T: int, layout: str, seed: int = 0):
    from cp_attn.bench.inputs import causal_topk

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn((n, V32["H"], V32["d_v"] + V32["rope"]), device="cuda", generator=g).bfloat16()
    kv = torch.randn((T, V32["d_v"] + V32["rope"]), device="cuda", generator=g).bfloat16()
    idx = causal_topk(n, T, V32["K"], seed=seed)          # last n rows of a causal sequence of T
    if layout == "early-rows":                              # first n rows: fewer than K valid each
        idx = causal_topk(n + V32["K"], n + V32["K"], V32["K"], seed=seed)[:n]
    elif layout == "shuffled":
        idx = idx.gather(1, torch.rand(idx.shape, device="cuda", generator=g).argsort(-1))
    elif layout == "several-seqs":                          # rows of 4 sequences of T/4 keys each
        L = T // 4
        seq = torch.arange(n, device="cuda") % 4
        idx = torch.where(idx >= 0, idx % L + (seq * L)[:, None].int(), -1)
    idx[::17] = -1                                          # all-invalid rows
    return q, kv, idx


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["topk", "early-rows", "shuffled", "several-seqs"])
@pytest.mark.parametrize("T", [16384, 65536], ids=["16K", "64K"])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_gpu_v32_shapes(layout, T, kv_dtype):
    q, kv, idx = _v32_case(96, T, layout)
    src = pack_mla_kv(kv, V32["d_v"]) if kv_dtype == "fp8" else kv
    out, lse = smt.sparse_mla(q, src, idx, 0.0722, V32["d_v"])
    want, want_lse = naive.sparse_mla(q.float(), src if kv_dtype == "fp8" else kv.float(), idx, 0.0722, V32["d_v"])
    rel = ((out.float() - want).norm() / want.norm()).item()
    assert rel < BF16_REL_L2, rel
    empty = ~(idx >= 0).any(-1)
    assert (lse[empty] == float("-inf")).all() and (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty], want_lse[~empty], atol=LSE_ATOL, rtol=0)


def test_compiles_for_hopper_without_spills():
    """The V3.2 launch config compiled for sm_90a here (Triton ships ptxas): the interpreter cannot
    catch what only the compiler refuses, and this pins what made the kernel fast on the H100: no
    register spills, the gathered rows streamed by asynchronous copies, wgmma for PV, within 227 KB."""
    from cp_attn.bench.compile_report import sparse_mla as compile_v32

    r = compile_v32()
    assert r["spill_store_bytes"] == 0, r
    assert r["async_copies"] > 0, r
    assert r["shared_bytes"] <= 227 * 1024, r
    assert "m64n256k16" in r["wgmma"], r
