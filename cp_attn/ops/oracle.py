"""The dense-mask oracle: sparse attention written as dense attention plus a -inf mask.

Uses the *naive* MLA form (per-head k/v decompressed by kv_b_proj, 192-wide scores) and scatters
the top-k indices into a [n, T] mask, as DeepSeek's `inference/model.py` and transformers' eager
path do. Nothing is shared with the absorbed sparse path except the indices, which makes it the
end-to-end reference for `cp_attn.ops.naive.sparse_mla`.
"""

from __future__ import annotations

import torch

from cp_attn.ops.naive import key_mask


def topk_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[n, K] indices (-1 = none) -> [n, T] bool, True at the selected keys."""
    n = indices.shape[0]
    mask = torch.zeros((n, num_keys + 1), dtype=torch.bool, device=indices.device)
    idx = torch.where(indices >= 0, indices.long(), num_keys)  # -1 -> spare column
    mask.scatter_(1, idx, True)
    return mask[:, :num_keys]


def dense_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v per head, fp32. q [n, H, Dqk], k [T, H, Dqk], v [T, H, Dv],
    mask [n, T] bool (True = attend) -> [n, H, Dv] in q's dtype; a row with nothing to attend is 0."""
    scores = torch.einsum("nhd,thd->nht", q.float(), k.float()) * sm_scale
    scores.masked_fill_(~mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.einsum("nht,thd->nhd", p, v.float()).to(q.dtype)


def dense_causal_mask(ks: torch.Tensor, ke: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[n, T] the full causal range of each row (what sparse attention equals when K >= length)."""
    return key_mask(ks, ke, num_keys)
