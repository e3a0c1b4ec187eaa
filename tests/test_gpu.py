"""The same forward on CUDA, and CP over NCCL. Skipped without a GPU (CI has none); run on the
device machines with `python -m pytest -q tests/test_gpu.py`.

References: the CPU fp32 forward (itself checked against transformers in test_reference_hf), and
for NCCL the single-GPU run of the same code with Comm.single().
"""

from __future__ import annotations

import pytest
import torch

from cp_attn.checkpoint import RandomSource, build_model
from cp_attn.comm import Comm
from cp_attn.config import preset
from cp_attn.inputs import random_prompts
from cp_attn.ops import naive
from cp_attn.parallel import cp_prefill, expert_placement
from tests.spawn import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LENS = [37, 1, 3, 20]
# fp32 on both sides with TF32 off: only summation order differs (cuBLAS vs CPU BLAS blocking), a
# few ulps per op over 3 layers; seen ~1e-6 on CPU-vs-CPU CP runs, so 1e-4 leaves wide headroom.
FP32_ATOL = 1e-4
# bf16 weights and activations against fp32: bf16 keeps 8 mantissa bits (2^-9 = 2e-3 relative per
# rounding); after 3 layers the logits' relative L2 error sits near 1e-2. 5e-2 flags real bugs
# (a wrong row or expert gives O(1)) without flaking on rounding.
BF16_REL_L2 = 5e-2
# bf16 against bf16 with other kernels: both sides round at ~2e-3 per op; a typical token's logits
# move by well under 1e-2 relative over 3 layers; 2e-2 flags a wrong row, head or index (O(1)).
BF16_TOKEN_REL = 2e-2
# Multi-GPU fp32 CP against single-GPU fp32: as on CPU (test_cp_prefill.CP_ATOL) plus cuBLAS
# choosing other kernels for other row counts.
NCCL_ATOL = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _dense_cfg():
    # index_topk above every length: attention is dense-causal, so GPU-vs-CPU rounding cannot flip
    # a near-tie in the top-k and the comparison isolates the arithmetic.
    return preset("tiny", index_topk=64)


def _logits(model, ids):
    out = cp_prefill(model, Comm.single(), ids, "in_seq", "fused")
    return model.logits(out.hidden).float().cpu()


def test_cuda_fp32_matches_cpu():
    cfg = _dense_cfg()
    ids = random_prompts(LENS, cfg.vocab_size, seed=1)
    cpu = _logits(build_model(RandomSource(cfg, 7)), ids)
    gpu = _logits(build_model(RandomSource(cfg, 7), device="cuda"), ids)
    torch.testing.assert_close(gpu, cpu, atol=FP32_ATOL, rtol=0)


def test_cuda_bf16_close_to_fp32():
    cfg = _dense_cfg()
    ids = random_prompts(LENS, cfg.vocab_size, seed=2)
    ref = _logits(build_model(RandomSource(cfg, 7)), ids)
    got = _logits(build_model(RandomSource(cfg, 7), device="cuda", dtype=torch.bfloat16), ids)
    assert torch.isfinite(got).all()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < BF16_REL_L2, f"bf16 relative L2 error {rel:.3g}"


def test_stage_ops_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    n, T, H, D, K = 50, 300, 8, 64, 32
    q, k = torch.randn(n, H, D, generator=g), torch.randn(T, D, generator=g)
    w = torch.randn(n, H, generator=g)
    ke = torch.randint(1, T + 1, (n,), generator=g)
    ks = (ke - torch.randint(1, 200, (n,), generator=g)).clamp(min=0)
    logits = naive.indexer_logits(q, k, w, ks, ke)
    torch.testing.assert_close(naive.indexer_logits(q.cuda(), k.cuda(), w.cuda(), ks.cuda(), ke.cuda()).cpu(),
                               logits, atol=1e-4, rtol=1e-5)
    # the same scores give the same keys, exact ties included
    logits = logits.round()
    idx = naive.topk_indices(logits, ks, ke, K)
    assert torch.equal(naive.topk_indices(logits.cuda(), ks.cuda(), ke.cuda(), K).cpu(), idx)
    qa, kv = torch.randn(n, H, 96, generator=g), torch.randn(T, 96, generator=g)
    out, lse = naive.sparse_mla(qa, kv, idx, 0.1, 64)
    out_c, lse_c = naive.sparse_mla(qa.cuda(), kv.cuda(), idx.cuda(), 0.1, 64)
    torch.testing.assert_close(out_c.cpu(), out, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse_c.cpu(), lse, atol=1e-4, rtol=1e-5)


NCCL_VARIANTS = [("torch", "auto", torch.float32), ("triton", "auto", torch.float32), ("triton", "fp8", torch.float32),
                 ("triton", "auto", torch.bfloat16)]
"""(kernels, kv_dtype, dtype) each CP run repeats, against one GPU with the same settings."""


def _nccl_run(model, comm, ids, mode, backend, kernels, kv_dtype):
    from cp_attn.ops.kernels import get_kernels

    out = cp_prefill(model, comm, ids, mode, backend, record_topk=True, kernels=get_kernels(kernels), kv_dtype=kv_dtype)
    return model.logits(out.hidden).float().cpu(), {k: v.cpu() for k, v in out.topk.items()}


def _nccl_worker(comm: Comm, lens: list[int]) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = preset("tiny")
    ids = random_prompts(lens, cfg.vocab_size, seed=3)
    res = {}
    for backend in ("fused", "deepep"):
        pl = expert_placement(backend, cfg, comm.rank, comm.size)
        for kernels, kv_dtype, dtype in NCCL_VARIANTS:
            model = build_model(RandomSource(cfg, 5), expert_ids=pl.expert_ids, expert_shard=pl.expert_shard,
                                device=f"cuda:{comm.rank}", dtype=dtype)
            for mode in ("in_seq", "round_robin"):
                res[mode, backend, kernels, kv_dtype, dtype] = _nccl_run(model, comm, ids, mode, backend, kernels, kv_dtype)
    return res


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("cp", [2, 4], ids=lambda c: f"cp{c}")
def test_nccl_cp_matches_single_gpu(cp):
    """Both modes and MoE backends, torch and Triton kernels, bf16 and FP8 KV: fp32 runs equal one GPU
    (NCCL_ATOL, exact top-k); the bf16 run's typical tokens within BF16_TOKEN_REL (its own rounding
    can flip a near-tie between row layouts)."""
    if torch.cuda.device_count() < cp:
        pytest.skip(f"needs {cp} GPUs")
    cfg = preset("tiny")
    lens = [37, 1, 3, 20, 2]
    ids = random_prompts(lens, cfg.vocab_size, seed=3)
    refs = {}
    for kernels, kv_dtype, dtype in NCCL_VARIANTS:
        model = build_model(RandomSource(cfg, 5), device="cuda", dtype=dtype)
        refs[kernels, kv_dtype, dtype] = _nccl_run(model, Comm.single(), ids, "in_seq", "fused", kernels, kv_dtype)
    for rank, res in enumerate(run_ranks(_nccl_worker, cp, lens, backend="nccl", timeout=600)):
        for (mode, backend, kernels, kv_dtype, dtype), (logits, topk) in res.items():
            ref_logits, ref_topk = refs[kernels, kv_dtype, dtype]
            where = f"rank {rank} {mode} {backend} kernels={kernels} kv={kv_dtype} {dtype}"
            if dtype == torch.bfloat16:
                per_token = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)
                assert per_token.median().item() < BF16_TOKEN_REL, where
                continue
            torch.testing.assert_close(logits, ref_logits, atol=NCCL_ATOL, rtol=0, msg=lambda m: f"{where}: {m}")
            for layer, idx in ref_topk.items():
                assert torch.equal(topk[layer], idx), f"{where}: layer {layer} top-k differs"


def test_cuda_triton_kernels_match_torch_kernels():
    """kernels=triton against kernels=torch on one GPU, fp32 (IEEE dots): same top-k, close logits;
    and in bf16 within the bf16 bound, with fp8 KV on both sides too."""
    from cp_attn.ops.kernels import get_kernels

    cfg = preset("tiny")
    ids = random_prompts([61, 7, 30, 1], cfg.vocab_size, seed=4)
    model = build_model(RandomSource(cfg, seed=2), dtype=torch.float32, device="cuda")
    runs = {name: cp_prefill(model, Comm.single(), ids, "in_seq", "fused", kernels=get_kernels(name), record_topk=True)
            for name in ("torch", "triton")}
    for layer, idx in runs["torch"].topk.items():
        assert torch.equal(idx, runs["triton"].topk[layer]), layer
    torch.testing.assert_close(runs["triton"].hidden, runs["torch"].hidden, atol=FP32_ATOL, rtol=0)
    # bf16: the kernels round differently (Triton rounds P to bf16 before PV, torch keeps fp32), and
    # after 3 layers a near-tie in MoE routing can flip and move a few tokens by O(1); so judge typical
    # tokens (median per-token relative error) and the argmax, with top-k dense (index_topk above
    # every length) so no selection can flip.
    model = build_model(RandomSource(_dense_cfg(), seed=2), dtype=torch.bfloat16, device="cuda")
    for kv_dtype in ("auto", "fp8"):
        ref, got = (model.logits(cp_prefill(model, Comm.single(), ids, "in_seq", "fused", kernels=get_kernels(k),
                                            kv_dtype=kv_dtype).hidden).float() for k in ("torch", "triton"))
        per_token = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert per_token.median().item() < BF16_TOKEN_REL, (kv_dtype, per_token.median().item())
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9, kv_dtype
