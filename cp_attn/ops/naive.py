"""Plain-torch references for the three sparse-attention stages, one function per stage.

Each has the signature its fast kernel will have (DeepGEMM `fp8_mqa_logits`, a top-k kernel,
FlashMLA `flash_mla_sparse_fwd`), so a fast op can be dropped in beside it and tested against it.
Letters: n local query rows, T gathered keys, H heads, D head dim, K top-k.
"""

from __future__ import annotations

import torch

INVALID = -1  # index of an empty top-k slot


def key_mask(ks: torch.Tensor, ke: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[n, T] True where key j is in row i's range [ks_i, ke_i)."""
    j = torch.arange(num_keys, device=ks.device)
    return (j[None, :] >= ks[:, None]) & (j[None, :] < ke[:, None])


def indexer_logits(
    q: torch.Tensor, k: torch.Tensor | tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
    ks: torch.Tensor, ke: torch.Tensor,
) -> torch.Tensor:
    """Lightning-indexer scores: out[i, j] = sum_h weights[i, h] * relu(q[i, h] . k[j]) for
    ks[i] <= j < ke[i], -inf elsewhere.

    q [n, H, D], k [T, D], weights [n, H] fp32 (head weight and every constant folded in),
    ks/ke [n] -> [n, T] fp32. Computed in fp32 whatever the input dtype.

    FP8 form (DeepGEMM's `fp8_mqa_logits`): q e4m3 [n, H, D] with its per-(token, head) scale
    already folded into `weights`, and k a tuple (e4m3 values [T, D], fp32 scale [T]) as
    `kv_fp8.quantize_index_k` returns it. Then out[i, j] = k_scale[j] * sum_h weights[i, h] *
    relu(q[i, h] . k_values[j]): the dot runs on the e4m3 values, the key's (positive) scale is
    applied after the head sum.
    """
    if isinstance(k, (tuple, list)):
        values, scale = k
        scores = torch.einsum("nhd,td->nht", q.float(), values.float()).relu_()
        logits = torch.einsum("nht,nh->nt", scores, weights.float()) * scale.float()[None, :]
        return logits.masked_fill_(~key_mask(ks, ke, values.shape[0]), float("-inf"))
    scores = torch.einsum("nhd,td->nht", q.float(), k.float()).relu_()
    logits = torch.einsum("nht,nh->nt", scores, weights.float())
    return logits.masked_fill_(~key_mask(ks, ke, k.shape[0]), float("-inf"))


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int) -> torch.Tensor:
    """The `topk` best keys of each row inside [ks, ke), as [n, topk] int32 in ascending key order,
    -1 in slots past the row's min(topk, ke - ks) keys.

    Ties at the cut go to the lower key index, so every correct implementation (and every CP rank
    layout) selects the same set even where ReLU makes many scores exactly equal.
    """
    n, T = logits.shape
    valid = key_mask(ks, ke, T)
    masked = logits.masked_fill(~valid, float("-inf"))
    k_eff = min(topk, T)
    if n == 0 or k_eff == 0:
        return torch.full((n, topk), INVALID, dtype=torch.int32, device=logits.device)
    kth = masked.topk(k_eff, dim=-1).values[:, -1:]          # [n, 1] value at the cut
    above = (masked > kth) & valid
    at_cut = (masked == kth) & valid
    need = k_eff - above.sum(-1, keepdim=True)               # tied keys still to take
    take = above | (at_cut & (at_cut.cumsum(-1) <= need))    # lower index first among ties
    slot = torch.arange(T, device=logits.device).expand(n, T)
    slot = torch.where(take, slot, T)                        # unselected -> T, sorts last
    idx = slot.topk(k_eff, dim=-1, largest=False, sorted=True).values
    idx = torch.where(idx < T, idx, INVALID).to(torch.int32)
    if k_eff < topk:
        idx = torch.cat([idx, idx.new_full((n, topk - k_eff), INVALID)], dim=-1)
    return idx


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-form sparse MLA over selected latent rows (FlashMLA's `flash_mla_sparse_fwd` math).

    q [n, H, Dqk] (Dqk = kv_lora_rank + rope dim), kv [T, Dqk] (the latent [c_kv | k_pe]; its first
    d_v columns are the values), indices [n, K] into kv with -1 = skip.
    Returns out [n, H, d_v] in q's dtype and lse [n, H] fp32 (natural log). A row with no valid
    index gets out = 0 and lse = -inf. Rows are processed `chunk` at a time to bound memory.
    FP8 KV: kv may be uint8 [T, W] rows in cp_attn.ops.kv_fp8's layout (656 bytes for V3.2), which
    are dequantised to q's dtype first (the kernels read the same bytes).
    """
    if kv.dtype == torch.uint8:
        from cp_attn.ops.kv_fp8 import unpack_mla_kv

        kv = unpack_mla_kv(kv, d_v, q.dtype)
    n, H, _ = q.shape
    out = q.new_empty((n, H, d_v))
    lse = torch.empty((n, H), dtype=torch.float32, device=q.device)
    for s in range(0, n, chunk):
        idx = indices[s : s + chunk].long()
        valid = (idx >= 0) & (idx < kv.shape[0])
        sel = kv[idx.clamp(0, kv.shape[0] - 1)].float()                       # [c, K, Dqk]
        sel.masked_fill_(~valid[..., None], 0.0)  # skipped slots read row 0: never let it in (0 * NaN)
        scores = torch.einsum("chd,ckd->chk", q[s : s + chunk].float(), sel) * sm_scale
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
        row_lse = scores.logsumexp(-1)                                        # [c, H]
        p = torch.exp(scores - row_lse[..., None]).nan_to_num_(0.0)            # empty rows -> 0
        out[s : s + chunk] = torch.einsum("chk,ckd->chd", p, sel[..., :d_v]).to(q.dtype)
        lse[s : s + chunk] = row_lse
    return out, lse
