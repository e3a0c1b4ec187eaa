"""Adapter to FlashMLA's SM90 sparse prefill (`flash_mla_sparse_fwd`), used when importable.

Looked for as `flash_mla` (built from FlashMLA's repository) or `sgl_kernel.flash_mla` (the
`sglang-kernel` wheel). Translates cp_attn.ops.naive.sparse_mla's contract to FlashMLA's:
    q [n, H, 576] bf16, kv [T, 576] bf16 -> kv [T, 1, 576]; indices [n, K] -> [n, 1, K'] int32 with K
    padded by -1 to a multiple of 128 (FlashMLA's SM90 tile); lse converted to natural log.
FP8 KV (uint8 rows, cp_attn.ops.kv_fp8 layout) is dequantised to bf16 first, as engines do for this
kernel, which reads bf16 only. Refused: H % 64 != 0, Dqk != 576 or d_v != 512 (its only shape).
"""

from __future__ import annotations

import functools
import math

import torch

HEAD_DIM, D_V, TOPK_TILE, HEAD_TILE = 576, 512, 128, 64


@functools.lru_cache(maxsize=None)
def load():
    """FlashMLA's `flash_mla_sparse_fwd`; ImportError naming both places when neither imports."""
    errors = []
    for module in ("flash_mla", "sgl_kernel.flash_mla"):
        try:
            mod = __import__(module, fromlist=["flash_mla_sparse_fwd"])
            return mod.flash_mla_sparse_fwd
        except (ImportError, AttributeError, OSError) as e:  # OSError: a wheel built for another torch
            errors.append(f"{module}: {e}")
    raise ImportError("FlashMLA is not importable (" + "; ".join(errors) + ")")


def check_shapes(q: torch.Tensor, d_v: int) -> None:
    n, H, Dqk = q.shape
    if Dqk != HEAD_DIM or d_v != D_V:
        raise ValueError(f"FlashMLA sparse prefill takes Dqk={HEAD_DIM}, d_v={D_V} only; got Dqk={Dqk}, d_v={d_v}")
    if H % HEAD_TILE:
        raise ValueError(f"FlashMLA sparse prefill needs heads % {HEAD_TILE} == 0; got H={H}")
    if not q.is_cuda:
        raise ValueError("FlashMLA needs CUDA tensors")


@functools.lru_cache(maxsize=None)
def lse_is_base2() -> bool:
    """Some FlashMLA versions return a base-2 lse: probe with one query over one key, whose lse is
    exactly its scaled score."""
    fwd = load()
    q = torch.zeros((1, HEAD_TILE, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
    kv = torch.zeros((1, 1, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
    q[..., 0], kv[..., 0] = 1.0, 2.0
    idx = torch.full((1, 1, TOPK_TILE), -1, dtype=torch.int32, device="cuda")
    idx[..., 0] = 0
    lse = fwd(q, kv, idx, 1.0, D_V)[2].float().flatten()[0].item()
    return math.isclose(lse, 2.0 / math.log(2), rel_tol=1e-2)


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cp_attn.ops.naive.sparse_mla's contract on FlashMLA."""
    fwd = load()
    check_shapes(q, d_v)
    if kv.dtype == torch.uint8:
        from cp_attn.ops.sparse_mla_triton import dequant_mla_kv

        kv = dequant_mla_kv(kv, D_V, HEAD_DIM - D_V, torch.bfloat16)
    n, K = indices.shape
    idx = torch.where((indices >= 0) & (indices < kv.shape[0]), indices, -1).to(torch.int32)
    if K % TOPK_TILE:
        idx = torch.nn.functional.pad(idx, (0, TOPK_TILE - K % TOPK_TILE), value=-1)
    out, _max_logits, lse = fwd(q.bfloat16().contiguous(), kv.bfloat16().contiguous()[:, None, :],
                                idx[:, None, :].contiguous(), sm_scale, d_v)
    lse = lse.float().reshape(n, -1)
    if lse_is_base2():
        lse = lse * math.log(2)
    empty = ~(idx >= 0).any(-1)  # FlashMLA's value for a row with no index is version-dependent
    lse = lse.masked_fill(empty[:, None], float("-inf"))
    out = out.reshape(n, -1, d_v).masked_fill(empty[:, None, None], 0.0)
    return out.to(q.dtype), lse
