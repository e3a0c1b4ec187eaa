"""DeepSeek V3 / V3.2 MoE: sigmoid gate with bias-corrected group-limited top-k, SwiGLU experts,
one shared expert. A layer may hold only some experts (deepep) or a slice of every expert's
intermediate dim (fused); `routed` skips experts it does not hold, so partial results from all
ranks add up to the full layer.

Gate (fp32), E experts in n_group groups:
    s = sigmoid(x W_g^T);  b = s + e_score_correction_bias           (b only for selection)
    group score = sum of its top-2 b; keep topk_group groups (others -inf); top-k experts by b
    w = s[idx] / sum s[idx] (if norm_topk_prob) * routed_scaling_factor

Routed experts run one of two ways, chosen by `MoE.impl` ('loop' | 'grouped' | 'auto'):
`routed_loop` (one expert at a time: the readable reference) or `routed_grouped` (rows sorted by
expert once, two grouped GEMMs over stacked weights: cp_attn.model.moe_grouped).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cp_attn.config import ModelConfig
from cp_attn.model.layers import SwiGLU
from cp_attn.model.moe_grouped import StackedExperts, check_impl, resolve_impl, routed_grouped, stack_experts


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
    """Routed experts (those in `expert_ids`) + the shared expert, each possibly an intermediate shard.

    impl: 'loop', 'grouped' or 'auto' (grouped where torch._grouped_mm runs the device and dtype).
    """

    def __init__(self, cfg: ModelConfig, expert_ids: Iterable[int] | None = None, shard: tuple[int, int] = (0, 1),
                 impl: str = "auto"):
        super().__init__()
        ids = range(cfg.n_routed_experts) if expert_ids is None else sorted(set(expert_ids))
        if any(not 0 <= e < cfg.n_routed_experts for e in ids):
            raise ValueError(f"expert ids {list(ids)} outside [0, {cfg.n_routed_experts})")
        self.n_experts = cfg.n_routed_experts
        self.impl = check_impl(impl)
        self.gate = Gate(cfg)
        self.experts = nn.ModuleDict({str(e): SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, shard) for e in ids})
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, shard)
        self._stack: StackedExperts | None = None

    @property
    def expert_ids(self) -> list[int]:
        return [int(e) for e in self.experts]

    def stack_experts(self) -> StackedExperts:
        """Stack the held experts' weights for the grouped path; their per-expert parameters become
        views of the stack (same state-dict names, no second copy). Called after loading; `stacked`
        redoes it when the views were broken (module.to(), a replaced Parameter)."""
        self._stack = stack_experts({int(e): m for e, m in self.experts.items()}, self.n_experts)
        return self._stack

    def stacked(self) -> StackedExperts:
        """The stack, rebuilt if the first or last expert's weights no longer live in it."""
        first, last = next(iter(self.experts.values())), list(self.experts.values())[-1]
        s = self._stack
        if s is None or not (s.backs(0, first) and s.backs(s.num_experts - 1, last)):
            s = self.stack_experts()
        return s

    def routed(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] * Expert_{expert_idx[:, k]}(x) over the experts this layer holds.

        x [n, hidden], expert_idx [n, k] global expert ids in [-1, n_routed_experts) (-1 and ids not
        held here add nothing), weights [n, k] fp32 -> [n, hidden] in x's dtype (accumulated in fp32).
        """
        if resolve_impl(self.impl, x.device, x.dtype) == "grouped":
            return self.routed_grouped(x, expert_idx, weights)
        return self.routed_loop(x, expert_idx, weights)

    def routed_loop(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`routed`, one expert at a time (the reference; one host sync per expert in nonzero)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in self.experts.items():
            rows, slot = (expert_idx == int(e)).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            y = expert(x[rows]).float() * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        return out.to(x.dtype)

    def routed_grouped(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`routed` through grouped GEMMs over the stacked experts, whatever `impl` says."""
        if not self.experts:
            return torch.zeros_like(x)
        return routed_grouped(self.stacked(), x, expert_idx, weights).to(x.dtype)


def moe_local(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Single-process MoE: every expert is here."""
    idx, w = moe.gate(x)
    return moe.routed(x, idx, w) + moe.shared_experts(x)


def set_moe_impl(model: nn.Module, impl: str) -> None:
    """Set `impl` on every MoE layer of `model`, stacking the experts now unless it is 'loop'."""
    check_impl(impl)
    for mod in model.modules():
        if isinstance(mod, MoE):
            mod.impl = impl
            if impl != "loop" and mod.experts:
                mod.stack_experts()
