"""Inputs shaped like a prefill's: the last n query rows of one causal sequence of T keys."""

from __future__ import annotations

import torch

from cp_attn.ops.naive import INVALID


def causal_ranges(n: int, T: int, device="cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """ks, ke [n] of the last n tokens of a sequence of T tokens (row i sits at position T - n + i)."""
    ke = torch.arange(T - n + 1, T + 1, device=device, dtype=torch.int32)
    return torch.zeros_like(ke), ke


def causal_topk(n: int, T: int, K: int, device="cuda", seed: int = 0, chunk: int = 2048) -> torch.Tensor:
    """[n, K] int32 in top-k's layout: min(K, pos + 1) distinct random causal keys per row, ascending,
    then -1. Rows near the sequence start hold fewer than K valid keys."""
    g = torch.Generator(device=device).manual_seed(seed)
    _, ke = causal_ranges(n, T, device)
    out = []
    for s in range(0, n, chunk):
        end = ke[s : s + chunk]
        score = torch.rand((end.numel(), T), device=device, generator=g)
        score.masked_fill_(torch.arange(T, device=device)[None, :] >= end[:, None], -1.0)
        val, idx = score.topk(min(K, T), dim=-1)
        idx = torch.where(val >= 0, idx, T).sort(dim=-1).values          # -1 slots sort last as T
        idx = torch.where(idx < T, idx, INVALID).to(torch.int32)
        if idx.shape[1] < K:
            idx = torch.cat([idx, idx.new_full((idx.shape[0], K - idx.shape[1]), INVALID)], dim=-1)
        out.append(idx)
    return torch.cat(out)
