"""Adapter to DeepGEMM's `fp8_mqa_logits` (SM90/SM100), with `naive.indexer_logits`' signature.

DeepGEMM computes out[i, j] = sum_h weights[i, h] * relu(q[i, h] . kv[j] * kv_scale[j]) for
ks[i] <= j < ke[i] and, with clean_logits=True, writes -inf elsewhere: the naive FP8 form exactly
(the scale is positive, so applying it inside or outside the ReLU is the same).

What it takes: the FP8 form only, q e4m3 [n, H, D] (its scale folded into `weights`) and
k = (e4m3 [T, D], fp32 scale [T]), with H in {32, 64} and D = 128 (DeepGEMM's SM90 kernels).
bf16 inputs are refused rather than quantised here: the keys must be quantised once per layer
(DESIGN.md, issue 8), not once per query chunk inside the indexer call, and a silent bf16 -> e4m3
rounding would change the selected keys. Quantise with `cp_attn.ops.kv_fp8.quantize_index_k` /
`quantize_index_q` before the call, or use the `triton` indexer, which takes bf16.

Importing this module imports `deep_gemm`; without it the registry reports the implementation as
not available (it is never required).
"""

from __future__ import annotations

import deep_gemm
import torch

HEADS = (32, 64)
HEAD_DIM = 128
FP8 = torch.float8_e4m3fn


def indexer_logits(q: torch.Tensor, k, weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """Indexer scores [n, T] fp32 through DeepGEMM; -inf outside each row's [ks, ke)."""
    if not isinstance(k, (tuple, list)) or q.dtype != FP8 or k[0].dtype != FP8:
        raise ValueError("the deepgemm indexer takes only the FP8 form (q e4m3, k = (e4m3 values, fp32 "
                         f"scale)); got q {q.dtype} and k {type(k).__name__}. Quantise once per layer "
                         "with cp_attn.ops.kv_fp8, or use indexer_logits=triton for bf16")
    kv, scale = k
    n, H, D = q.shape
    if H not in HEADS or D != HEAD_DIM:
        raise ValueError(f"DeepGEMM's fp8_mqa_logits takes H in {HEADS} and D = {HEAD_DIM}, got H={H}, D={D}")
    if kv.shape != (kv.shape[0], D) or scale.shape != (kv.shape[0],) or weights.shape != (n, H):
        raise ValueError(f"need k [T, {D}], scale [T], weights [{n}, {H}]; got {tuple(kv.shape)}, "
                         f"{tuple(scale.shape)}, {tuple(weights.shape)}")
    T = kv.shape[0]
    # DeepGEMM reads int32 bounds and assumes 0 <= ks <= ke <= T (the naive op clamps implicitly).
    ke32 = ke.clamp(0, T).int().contiguous()
    ks32 = torch.minimum(ks.clamp(0, T).int(), ke32).contiguous()
    out = deep_gemm.fp8_mqa_logits(q.contiguous(), (kv.contiguous(), scale.float().contiguous()),
                                   weights.float().contiguous(), ks32, ke32, clean_logits=True)
    return out[:, :T]
