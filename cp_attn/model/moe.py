"""DeepSeek V3 / V3.2 MoE: sigmoid gate with bias-corrected group-limited top-k, SwiGLU experts,
one shared expert. A layer may hold only some experts (deepep) or a slice of every expert's
intermediate dim (fused); `routed` skips experts it does not hold, so partial results from all
ranks add up to the full layer.

Gate (fp32), E experts in n_group groups:
    s = sigmoid(x W_g^T);  b = s + e_score_correction_bias           (b only for selection)
    group score = sum of its top-2 b; keep topk_group groups (others -inf); top-k experts by b
    w = s[idx] / sum s[idx] (if norm_topk_prob) * routed_scaling_factor
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cp_attn.config import ModelConfig
from cp_attn.model.layers import SwiGLU


class Gate(nn.Module):
    """Router: [n, hidden] -> expert ids [n, k] (int64) and weights [n, k] (fp32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(x.float() @ self.weight.float().t())            # [n, E]
        biased = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = biased.unflatten(-1, (self.n_group, -1))                   # [n, G, E/G]
            group_score = grouped.topk(2, dim=-1).values.sum(-1)                 # [n, G]
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        idx = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * self.scaling


class MoE(nn.Module):
    """Routed experts (those in `expert_ids`) + the shared expert, each possibly an intermediate shard."""

    def __init__(self, cfg: ModelConfig, expert_ids: Iterable[int] | None = None, shard: tuple[int, int] = (0, 1)):
        super().__init__()
        ids = range(cfg.n_routed_experts) if expert_ids is None else sorted(set(expert_ids))
        if any(not 0 <= e < cfg.n_routed_experts for e in ids):
            raise ValueError(f"expert ids {list(ids)} outside [0, {cfg.n_routed_experts})")
        self.gate = Gate(cfg)
        self.experts = nn.ModuleDict({str(e): SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, shard) for e in ids})
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, shard)

    @property
    def expert_ids(self) -> list[int]:
        return [int(e) for e in self.experts]

    def routed(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] * Expert_{expert_idx[:, k]}(x) over the experts this layer holds.

        x [n, hidden], expert_idx [n, k] global expert ids (-1 or not-held ids are skipped),
        weights [n, k] fp32 -> [n, hidden] in x's dtype (accumulated in fp32).
        """
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in self.experts.items():
            rows, slot = (expert_idx == int(e)).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            y = expert(x[rows]).float() * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        return out.to(x.dtype)


def moe_local(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Single-process MoE: every expert is here."""
    idx, w = moe.gate(x)
    return moe.routed(x, idx, w) + moe.shared_experts(x)
