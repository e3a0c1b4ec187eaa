"""Small building blocks: RMSNorm and the SwiGLU MLP (dense layers, experts, shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def shard_range(size: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of part `index` of `count` near-equal parts of `size` (torch.tensor_split rule)."""
    base, rem = divmod(size, count)
    start = index * base + min(index, rem)
    return start, start + base + (index < rem)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x). With shard=(i, n) it holds part i of n of the intermediate dim:
    partial outputs of all parts sum to the full output (used by the fused MoE backend)."""

    def __init__(self, dim: int, inter: int, shard: tuple[int, int] = (0, 1)):
        super().__init__()
        self.full_inter = inter
        self.shard = shard
        start, stop = shard_range(inter, *shard)
        local = stop - start
        self.gate_proj = nn.Linear(dim, local, bias=False)
        self.up_proj = nn.Linear(dim, local, bias=False)
        self.down_proj = nn.Linear(local, dim, bias=False)

    def checkpoint_slices(self) -> dict[str, tuple[int, int, int]]:
        """Parameter name -> (dim, start, stop) of the checkpoint tensor this module holds."""
        start, stop = shard_range(self.full_inter, *self.shard)
        if (start, stop) == (0, self.full_inter):
            return {}
        return {"gate_proj.weight": (0, start, stop), "up_proj.weight": (0, start, stop), "down_proj.weight": (1, start, stop)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
